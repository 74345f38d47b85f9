"""Small file helpers every tier uses: numbered files in their numeric order, and file digests
(memoised by path, size and mtime for the big files a build reads on every run)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, TypeVar

P = TypeVar("P", str, Path)


def number_of(path: str | Path) -> int:
    """N of `<name>_N.<ext>` (img_emb_12.npy -> 12)."""
    return int(Path(path).stem.rsplit("_", 1)[1])


def by_number(paths: Iterable[P]) -> list[P]:
    """`paths` in numeric order of their `_N` suffix (img_emb_2 before img_emb_10)."""
    return sorted(paths, key=number_of)


def numbered(folder: Path, prefix: str, suffix: str) -> list[Path]:
    """The files `<prefix>_N<suffix>` in `folder`, in numeric order."""
    return by_number(folder.glob(f"{prefix}_*{suffix}"))


def digest(path: str | Path, algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes, read in blocks (hashlib.file_digest)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def memo_digest(path: str | Path, algorithm: str = "md5") -> str:
    """`digest(path)`, remembered in data/.work/<algorithm>/ by the file's resolved path, size
    and mtime: hashing a ViT-L/14 checkpoint or a 1 GB source part on every build costs seconds,
    a stat costs microseconds. A file rewritten in place gets a new mtime, so a new digest."""
    from laionbuild.project.atomic import atomic_write_text
    from laionbuild.project.layout import WORK

    path = Path(path)
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    memo = WORK / algorithm / hashlib.md5(key).hexdigest()
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    value = digest(path, algorithm)
    atomic_write_text(memo, value)
    return value
