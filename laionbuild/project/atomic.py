"""Atomic outputs: a stage builds its output in `data/.tmp/` and renames it into place, so a
killed stage never leaves a half output that looks complete."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from laionbuild.project.layout import TMP


def _tmp_for(final: Path, beside: bool) -> Path:
    # Unique per output and per process; on the same filesystem as the output so rename is atomic.
    if beside:
        return final.parent / f".{final.name}.{os.getpid()}.tmp"
    flat = "__".join(final.parts)
    return TMP / f"{flat}.{os.getpid()}"


@contextmanager
def atomic_dir(final: str | Path, beside: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `final` in one rename. The
    temporary directory is under the project's data/.tmp, or with `beside` next to `final` (an
    output outside a project)."""
    final = Path(final)
    tmp = _tmp_for(final, beside)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final` (same filesystem) to write; on success it replaces
    `final` in one rename (a new inode: a hard-linked old file, e.g. in DVC's cache, is never
    modified); on failure it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_file(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | Path, text: str) -> None:
    with atomic_file(final) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
