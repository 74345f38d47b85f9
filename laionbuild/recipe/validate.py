"""A composed recipe (a plain dict) -> a typed `Config`, or one RecipeError naming the key
path, the bad value, where it came from and what would be accepted."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, List, Optional, Sequence

from laionbuild.recipe.errors import RecipeError
from laionbuild.recipe.provenance import Origin

MAX_SHOWN = 80  # characters of a bad value shown in a message
FREE_FORM = "any key goes here (a mapping of names)"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def message(where: str, key: str, value: Any, problem: str, origin: Optional[Origin] = None) -> str:
    source = origin(key) if origin else None
    got = f"got {_shown(value)}" + (f" from {source}" if source else "")
    return f"{where}: invalid value for `{key}` ({got}): {problem}"


def _unwrap(tp: Any) -> Any:
    """Optional[X] / Annotated[X, ...] -> X."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return tp


def fields_at(schema: type, path: Sequence[Any]) -> List[str]:
    """The keys the schema allows under `path` (empty where it is a free-form mapping)."""
    tp: Any = schema
    for name in path:
        tp = _unwrap(tp)
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp, include_extras=True).get(name)
        elif typing.get_origin(tp) in (dict, Dict):
            tp = typing.get_args(tp)[1]
        else:
            return []
    tp = _unwrap(tp)
    if dataclasses.is_dataclass(tp):
        return list(tp.__dataclass_fields__)
    if typing.get_origin(tp) in (dict, Dict) and typing.get_origin(typing.get_args(tp)[0]) is typing.Literal:
        return list(typing.get_args(typing.get_args(tp)[0]))  # e.g. source.columns: canonical columns
    return []


def unknown_key_hint(schema: type, path: Sequence[Any]) -> str:
    """A did-you-mean for the first segment of `path` the schema does not know."""
    for depth in range(1, len(path)):
        if path[depth - 1] not in fields_at(schema, path[:depth - 1]) and fields_at(schema, path[:depth - 1]):
            return unknown_key_hint(schema, path[:depth])
    allowed = fields_at(schema, path[:-1])
    close = difflib.get_close_matches(str(path[-1]), allowed, n=1, cutoff=0.6)
    prefix = ".".join(map(str, path[:-1]))
    if close:
        return f"did you mean `{prefix + '.' if prefix else ''}{close[0]}`?"
    return f"keys here: {', '.join(allowed)}" if allowed else FREE_FORM


def _pydantic_error(schema: type, error: Dict[str, Any], where: str, origin: Optional[Origin]) -> str:
    loc = [part for part in error["loc"] if not isinstance(part, str) or not part.startswith("function-")]
    if loc[-1] == "[key]":  # a mapping key outside its value set (e.g. source.columns.NAME)
        loc = loc[:-1]
        return message(where, ".".join(map(str, loc)), loc[-1], f"unknown key: {error['msg']}", origin)
    key = ".".join(map(str, loc))
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        source = origin(key) if origin else None
        return (f"{where}: unknown key `{key}`" + (f" (from {source})" if source else "")
                + f": {unknown_key_hint(schema, loc)}")
    return message(where, key, error.get("input"), error["msg"].removeprefix("Value error, "), origin)


def typed(schema: type, raw: Dict[str, Any], where: str, origin: Optional[Origin] = None) -> Any:
    """Types, ranges and value sets: pydantic's checks of the dataclasses."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(schema).validate_python(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise RecipeError(_pydantic_error(schema, errors[0], where, origin) + more) from None


def validate(schema: type, raw: Dict[str, Any], where: str, origin: Optional[Origin] = None) -> Any:
    from laionbuild.recipe.checks import problems

    cfg = typed(schema, raw, where, origin)
    for key, value, problem in problems(cfg):
        raise RecipeError(message(where, key, value, problem, origin))
    return cfg
