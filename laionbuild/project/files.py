"""Small file helpers every tier uses: numbered files in their numeric order, and file digests."""

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
