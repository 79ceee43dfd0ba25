"""Every config key with its default and its meaning, read from the config dataclasses themselves.

Why from the source: a second, hand-written list of keys drifts from the dataclasses the first time a key is added.
The meaning of a field is the comment beside it in `common/config.py` (the comment lines right above the field,
then the one after it on its line), read with `tokenize` so a '#' inside a string is not a comment; a section's
meaning is its class docstring's first paragraph. tests/test_config_help.py fails when a key has no meaning.
`dopd config show` prints all of it as a YAML file one can edit and pass to `--config`.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import yaml

from dopd.common.config import Config


@dataclass
class KeyDoc:
    key: str  # dotted: section.name (top-level keys have no section)
    default: Any
    type: str
    meaning: str


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " | ".join(_type_name(a) for a in inner) + (" | null" if len(inner) < len(args) else "")
    if origin is list:
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


@cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment above it and beside it, joined into one line} for a dataclass."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    trailing: dict[int, str] = {}
    standalone: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string.lstrip("#").strip()
        text = re.sub(r"\s*fmt:\s*(skip|off|on)\s*$", "", text)
        row = tok.start[0] - 1
        (standalone if lines[row].lstrip().startswith("#") else trailing)[row] = text
    out = {}
    names = {f.name for f in dataclasses.fields(cls)}
    field_re = re.compile(r"^    (\w+)\s*:")
    for row, line in enumerate(lines):
        m = field_re.match(line)
        if not m or m.group(1) not in names:
            continue
        above = []
        r = row - 1
        while r >= 0 and r in standalone:
            above.insert(0, standalone[r])
            r -= 1
        parts = [" ".join(above)] if above else []
        if trailing.get(row):
            parts.append(trailing[row])
        out[m.group(1)] = " ".join(p for p in parts if p).strip()
    return out


def section_meaning(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def key_docs(cls: type = Config, prefix: str = "") -> list[KeyDoc]:
    """Every key of the config (sections expanded), in declaration order."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += key_docs(tp, f"{prefix}{f.name}.")
        else:
            out.append(KeyDoc(prefix + f.name, _default(f), _type_name(tp), comments.get(f.name, "")))
    return out


def _scalar(v: Any) -> str:
    """A value as YAML flow text on one line."""
    text = yaml.safe_dump(v, default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def render_yaml(cfg: Config | None = None) -> str:
    """The whole config as YAML: every key with its value (the defaults, or `cfg`'s) and, as a comment, its
    accepted values and meaning. Loading the output gives back the same config."""
    cfg = cfg or Config()
    values = cfg.to_dict()
    lines = [
        "# dopd config: every key, its value and its meaning (`dopd config show`); edit and pass with --config",
        "",
    ]

    def emit(cls: type, tree: dict, indent: str) -> None:
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append("")
                lines.append(f"{indent}{f.name}:  # {section_meaning(tp)}")
                emit(tp, tree[f.name], indent + "  ")
                continue
            kind = _type_name(tp)
            note = comments.get(f.name, "")
            if typing.get_origin(tp) is Literal or " | " in kind:
                note = f"[{kind}] {note}".strip()
            lines.append(f"{indent}{f.name}: {_scalar(tree[f.name])}" + (f"  # {note}" if note else ""))

    emit(Config, values, "")
    return "\n".join(lines) + "\n"
