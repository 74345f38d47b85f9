"""Images of a build read back from its webdataset shards (never re-downloaded), and thumbnails
of them: the report's grids, the search page and the projector's sprite all use these.

Two kinds of shards: img2dataset's per part (`data/images/part_N/NNNNN.tar`, samples named by
img2dataset's own key, our key in each sample's `.json` and in the shard's `.parquet`) and the
assembled dataset's (`data/dataset/NNNNN.tar`, samples named by our key)."""

from __future__ import annotations

import base64
import io
import tarfile
import threading
from contextlib import ExitStack
from typing import BinaryIO, Callable

import pyarrow.parquet as pq
from PIL import Image

from laionbuild.project.layout import part_dir
from laionbuild.shards.storage import open_binary

IMAGE_EXTENSIONS = ("jpg", "png", "webp", "jpeg")


class ShardImages:
    """key -> image bytes over a set of tar shards, each opened once and kept open until
    `close()` (or the end of a `with` block). `open_file` opens a shard (a local path by
    default; a DVC filesystem's `open` to read a build at another revision)."""

    def __init__(self, open_file: Callable[[str], BinaryIO] | None = None):
        self._open = open_file or open_binary
        self._stack = ExitStack()
        self._tars: dict[str, tarfile.TarFile] = {}
        self._where: dict[str, tuple[str, str]] = {}  # key -> (shard, member stem)
        self._lock = threading.Lock()  # one file position per open shard: reads take turns

    def add_shard(self, shard: str, keys: dict[str, str] | None = None) -> None:
        """Register the samples of one shard: `keys` maps our key -> the member stem (img2dataset's
        key); without it every image member is registered under its own stem."""
        if keys is not None:
            for key, stem in keys.items():
                self._where[key] = (shard, stem)
            return
        with self._lock:
            names = self._tar(shard).getnames()
        for name in names:
            stem, _, ext = name.partition(".")
            if ext in IMAGE_EXTENSIONS:
                self._where[stem] = (shard, stem)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def read(self, key: str) -> bytes:
        shard, stem = self._where[key]
        with self._lock:
            tar = self._tar(shard)
            for ext in IMAGE_EXTENSIONS:
                try:
                    member = tar.getmember(f"{stem}.{ext}")
                except KeyError:
                    continue
                return tar.extractfile(member).read()
        raise KeyError(f"{shard}: no image for sample {stem}")

    def _tar(self, shard: str) -> tarfile.TarFile:
        if shard not in self._tars:
            self._tars[shard] = self._stack.enter_context(
                tarfile.open(fileobj=self._stack.enter_context(self._open(shard)), mode="r:"))
        return self._tars[shard]

    def close(self) -> None:
        self._stack.close()
        self._tars.clear()

    def __enter__(self) -> "ShardImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def add_downloaded_parts(images: ShardImages, parts, exclude=None, only=None) -> None:
    """Register the successfully downloaded samples of img2dataset's shards of `parts`, by our
    key, from the shards' parquet files (no tar is opened until an image is read), less the
    keys of `exclude` (a table with a `key` column: samples an image hash list matched), and
    with `only` (a set of keys) just those: serve on a sweep point maps its selected samples,
    not every downloaded one (~400M Python entries at LAION-400M)."""
    from laionbuild.project.layout import KEY_COLUMN
    from laionbuild.shards.storage import part_shards

    left_out = set(exclude.column("key").to_pylist()) if exclude is not None else set()
    for part in parts:
        for shard in part_shards(part_dir("download", part)):
            rows = pq.read_table(shard.parquet, columns=["key", "status", KEY_COLUMN]).to_pydict()
            images.add_shard(shard.location, {ours: stem for stem, status, ours in
                                              zip(rows["key"], rows["status"], rows[KEY_COLUMN])
                                              if status == "success" and ours not in left_out
                                              and (only is None or ours in only)})


def thumbnail(data: bytes, size: int, square: bool = False) -> Image.Image:
    """An RGB thumbnail fitting in size x size; `square` pads it (centred, white) to exactly
    size x size, as a sprite cell must be."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((size, size))
    if not square:
        return image
    cell = Image.new("RGB", (size, size), "white")
    cell.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return cell


def data_uri(image: Image.Image, quality: int = 80) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()

