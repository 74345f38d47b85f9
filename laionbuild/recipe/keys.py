"""Every recipe key with its type, default, allowed values and the comment next to it in the
schema (laionbuild/recipe/schema.py): `laionbuild compose --help-keys` and docs/keys.md (kept equal
to this output by tests/test_recipe_schema.py)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from typing import Any, Dict, Iterator, List, Tuple

from pydantic import BeforeValidator
from pydantic.fields import FieldInfo

HEADER = """# Recipe keys

Every key of a recipe (`conf/<group>/<option>.yaml`, overrides `group.key=value`, `params.yaml`),
generated from the schema in `laionbuild/recipe/schema.py` by `laionbuild compose --help-keys`
(tests/test_recipe_schema.py keeps this file equal to it). `NAME` stands for any name chosen by
the recipe (a mapping's key). A composed recipe is checked against it before any stage runs:
unknown keys, wrong types, values out of range, and the checks across sections
(laionbuild/recipe/checks.py) are refused, naming the key, the value and where it came from.
"""


# values checked against the installed libraries, not a type (laionbuild/recipe/checks.py and
# open_clip_catalog.py)
CHECKED_ELSEWHERE = {
    "embed.model": "an open_clip architecture or one of laionbuild/models/model_configs/",
    "embed.pretrained": "`random`, a pretrained tag of embed.model, or an existing checkpoint file",
    "embed.extra_models.NAME.model": "an open_clip architecture or one of laionbuild/models/model_configs/",
    "embed.extra_models.NAME.pretrained": "`random`, a pretrained tag of its model, or an existing checkpoint file",
    "prepare.languages": "ISO 639-1 codes langid detects (e.g. `en`, `de`)",
    "download.shards_url": "an fsspec URL of an installed filesystem, or an absolute path",
    "source.part_pattern": "has `{part}` when source.num_parts > 1 (unless source.files)",
}


def _comments(cls: type) -> Dict[str, str]:
    """field -> the comment on its line, or the comment lines just above it."""
    try:
        lines, start = inspect.getsourcelines(cls)
    except OSError:  # a class made by make_dataclass (Config): no source, no comments
        return {}
    tree = ast.parse(inspect.getsource(cls))
    found = {}
    for node in tree.body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row = node.lineno - 1
        text = lines[node.end_lineno - 1].split("  # ", 1)[1].strip() if "  # " in lines[node.end_lineno - 1] else ""
        above = []
        while row > 0 and lines[row - 1].strip().startswith("#"):
            row -= 1
            above.insert(0, lines[row].strip().lstrip("#").strip())
        found[node.target.id] = " ".join([*above, text]).strip()
    return found


def _constraint(meta: Any) -> str:
    if isinstance(meta, FieldInfo):
        return ", ".join(_constraint(m) for m in meta.metadata)
    for name, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if hasattr(meta, name):
            return f"{symbol} {getattr(meta, name)}"
    if hasattr(meta, "pattern"):
        return f"matches `{meta.pattern}`"
    if isinstance(meta, BeforeValidator):
        return getattr(meta.func, "description", "checked")
    return ""


def describe_type(tp: Any) -> Tuple[str, str]:
    """(type, allowed) in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        inner, allowed = describe_type(args[0])
        extra = ", ".join(c for c in (_constraint(m) for m in args[1:]) if c)
        return inner, ", ".join(a for a in (allowed, extra) if a)
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        inner, allowed = describe_type(rest[0])
        return f"{inner} or null", allowed
    if origin is typing.Literal:
        return "str", " | ".join(f"`{a}`" for a in args)
    if origin in (list, List):
        inner, allowed = describe_type(args[0])
        return f"list of {inner}", allowed
    if origin in (dict, Dict):
        key, key_allowed = describe_type(args[0])
        value, value_allowed = describe_type(args[1])
        value = "section" if dataclasses.is_dataclass(args[1]) else value
        allowed = "; ".join(a for a in (f"keys: {key_allowed}" if key_allowed else "", value_allowed) if a)
        return f"mapping of {value}", allowed
    return getattr(tp, "__name__", str(tp)), ""


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return ""
    else:
        value = f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if not isinstance(value, str) else (f"`{value}`" if value else '`""`')


def rows(schema: type, prefix: str = "") -> Iterator[Tuple[str, str, str, str, str]]:
    hints = typing.get_type_hints(schema, include_extras=True)
    comments = _comments(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from rows(tp, f"{key}.")
            continue
        kind, allowed = describe_type(tp)
        allowed = ", ".join(a for a in (allowed, CHECKED_ELSEWHERE.get(key, "")) if a)
        yield key, kind, _default(f), allowed, comments.get(f.name, "")
        value = typing.get_args(tp)[1] if typing.get_origin(tp) in (dict, Dict) else None
        if value is not None and dataclasses.is_dataclass(value):
            yield from rows(value, f"{key}.NAME.")
        origin = typing.get_origin(tp)
        entries = [a for a in typing.get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if entries and origin in (list, List):  # a list of sections: each entry's keys
            yield from rows(entries[0], f"{key}.N.")
        elif entries and origin is typing.Union:  # an optional section (null: off)
            yield from rows(entries[0], f"{key}.")


SPEED_NOTE = "**Speed only**: changes no output, so no stage reruns when it changes (not tracked by DVC)."


def keys_table() -> str:
    from laionbuild.recipe.schema import SPEED_KNOBS, UNTRACKED_SECTIONS, Config

    out = [HEADER]
    section = None
    for key, kind, default, allowed, comment in rows(Config):
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            out += ["", f"## {section}", ""]
            if section in UNTRACKED_SECTIONS:
                out += ["Not tracked by DVC: every engine gives the same outputs, so switching or tuning it reruns "
                        "nothing.", ""]
            out += ["| key | type | default | allowed | notes |", "|---|---|---|---|---|"]
        if key in SPEED_KNOBS:
            comment = f"{SPEED_NOTE} {comment}".strip()
        cells = [f"`{key}`", kind, default, allowed, comment]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"
