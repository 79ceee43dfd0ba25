"""The README's figures are read from the committed outputs that produced them.

Each headline figure in README.md carries a comment naming its source, right after the number:
`**1.889** <!-- fig: docs/demo/make_run_fresh.log ~ done: held-out tau 1.000 -> ([0-9.]+) -->` (a regex whose first
group is the value, searched in a text file) or `**1.605** <!-- fig: docs/plateau/summary.json#/tau_warmup -->` (a
JSON pointer, RFC 6901). The number shown must equal the source's value rounded to the digits shown, so a rerun
that changes a committed output fails here until the README says the new number; and a bold number without a
source comment fails too (a headline figure nobody can rerun).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIG = re.compile(r"<!-- fig: (?P<path>\S+?)(?:#(?P<pointer>/[^>]*?)| ~ (?P<regex>.*?)) -->")
NUMBER_BEFORE = re.compile(r"([-+]?\d[\d,]*(?:\.\d+)?)\s*\**\s*$")
BOLD_NUMBER = re.compile(r"\*\*([-+]?\d[\d,]*(?:\.\d+)?)\*\*(?!\s*<!-- fig:)")


def json_pointer(doc, pointer: str):
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def source_value(path: str, pointer: str | None, regex: str | None) -> float:
    file = ROOT / path
    assert file.is_file(), f"the README cites {path}, which is not committed"
    if pointer is not None:
        return float(json_pointer(json.loads(file.read_text()), pointer))
    match = re.search(regex, file.read_text())
    assert match, f"{path}: no line matches {regex!r}"
    return float(match.group(1).replace(",", ""))


def shown_matches(shown: str, value: float) -> bool:
    """`shown` is `value` rounded to the digits it shows (1.889 for 1.8886; 626 for 626)."""
    text = shown.replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{value:.{decimals}f}" == f"{float(text):.{decimals}f}"


def figures(text: str) -> list[tuple[str, str, float]]:
    found = []
    for m in FIG.finditer(text):
        before = NUMBER_BEFORE.search(text[: m.start()])
        assert before, f"no number right before {m.group(0)}"
        found.append((before.group(1), m.group(0), source_value(m["path"], m["pointer"], m["regex"])))
    return found


def test_every_readme_figure_equals_its_committed_source():
    text = (ROOT / "README.md").read_text()
    found = figures(text)
    assert len(found) >= 8, "the README's headline figures lost their source comments"
    wrong = [f"{shown} vs {value} ({comment})" for shown, comment, value in found if not shown_matches(shown, value)]
    assert not wrong, "README figures that disagree with their committed outputs: " + "; ".join(wrong)


def test_every_bold_readme_number_names_its_source():
    text = (ROOT / "README.md").read_text()
    assert BOLD_NUMBER.findall(text) == []


def test_the_check_fails_on_a_changed_number():
    text = (ROOT / "README.md").read_text()
    shown, comment, value = figures(text)[0]
    changed = f"{float(shown.replace(',', '')) + 0.1:.3f}"
    assert not shown_matches(changed, value)
    assert shown_matches(shown, value)
    with pytest.raises(AssertionError):
        source_value("docs/no-such-output.json", "/tau", None)


def test_readme_is_a_front_door():
    """A newcomer reads it in five minutes: tau is defined on the first screen, and the whole file is short."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, len(lines)
    assert any("**tau**" in line for line in lines[:15])
