"""The test suite's slowest tests, before and after: read from the `--durations` lines of pytest logs.

    python bench/test_durations.py --before serial.log --after make_test.log [--top 10]

pytest prints `12.34s call     tests/test_x.py::test_y` for its slowest phases (`--durations=15` is in the
project's addopts; `make test` runs two pytest phases, so its log holds two such lists). A test's cost here is the
sum of its setup, call and teardown lines (setup carries a session fixture's first build). The table lists the
`--top` slowest tests of the "before" log with their cost in both logs ("-" where a log did not list the test among
its slowest), and each log's wall time from pytest's summary lines.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S+)")
SUMMARY = re.compile(r"(?:(\d+) failed, )?(\d+) passed.* in ([0-9.]+)s")


def durations(text: str) -> dict[str, float]:
    """Seconds per test id over every `--durations` list in `text` (setup + call + teardown)."""
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            out[m.group(3)] += float(m.group(1))
    return dict(out)


def walls(text: str) -> list[tuple[int, int, float]]:
    """(passed, failed, seconds) of every pytest summary line in `text`."""
    return [(int(m.group(2)), int(m.group(1) or 0), float(m.group(3))) for m in SUMMARY.finditer(text)]


def table(before: str, after: str, top: int) -> str:
    b, a = durations(before), durations(after)
    if not b:
        raise SystemExit("the 'before' log has no --durations lines (run pytest with --durations=N)")
    rows = [f"{'before':>8} {'after':>8}  test"]
    for test in sorted(b, key=lambda t: -b[t])[:top]:
        after_s = f"{a[test]:7.1f}s" if test in a else f"{'-':>8}"
        rows.append(f"{b[test]:7.1f}s {after_s}  {test}")
    for name, text in (("before", before), ("after", after)):
        w = walls(text)
        parts = " + ".join(f"{s:.0f} s ({n} passed{f', {f} failed' if f else ''})" for n, f, s in w)
        rows.append(f"{name}: pytest wall {parts} = {sum(s for *_, s in w):.0f} s")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, type=Path)
    ap.add_argument("--after", required=True, type=Path)
    ap.add_argument("--top", type=int, default=10)
    a = ap.parse_args()
    print(table(a.before.read_text(), a.after.read_text(), a.top), flush=True)


if __name__ == "__main__":
    main()
