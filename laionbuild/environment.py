"""Environment variables set for a while and restored afterwards, in this process's
`os.environ` or in any other mapping (a SparkContext's executor environment)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Mapping, MutableMapping


@contextmanager
def patched(values: Mapping[str, str | None], into: MutableMapping[str, str] | None = None) -> Iterator[None]:
    """Set `values` in `into` (default: os.environ; None: unset) while open; on exit every name
    gets its old value back, or is unset if it had none."""
    target = os.environ if into is None else into
    saved = {name: target.get(name) for name in values}
    try:
        _assign(target, values)
        yield
    finally:
        _assign(target, saved)


def _assign(target: MutableMapping[str, str], values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
