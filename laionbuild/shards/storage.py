"""Shards outside the workspace: `download.shards_url`.

By default img2dataset's shards live in the workspace (`data/images/part_N/`), cached by DVC like
every other output. With `download.shards_url` set to an fsspec URL (`s3://bucket/prefix`,
`gs://…`, `hdfs://…`, or `file:///mnt/shared/…` for a shared mount), img2dataset writes them
there instead, so Spark executors on other machines can write them and the images never pass
through the driver's disk:

- each part's shards go under `<shards_url>/part_N-<fingerprint>/`, the fingerprint being a hash
  of the part's deduped metadata and every `download` setting but the speed knobs: one prefix
  per distinct input of the stage, never written again once complete, so experiments never
  overwrite each other's shards, a rebuild with more threads writes no second copy, and an
  interrupted download resumes in the same prefix (img2dataset's incremental mode); one build at
  a time writes a prefix, the others wait for it (laionbuild/shards/lease.py);
- `data/images/part_N/` (the DVC output) keeps what the funnel, the report and the readers need:
  img2dataset's per-shard `.parquet` and `_stats.json`, `stats.json`, and `shards.json`, the
  manifest naming the prefix and each `.tar` with its size. The manifest is written last, in the
  atomic commit of the part, so a half-written prefix never looks complete;
- readers (faces, embed, assemble, report grids) open the tars through fsspec; clip-retrieval's
  webdataset reader gets them as `pipe:` commands of `python -m laionbuild.shards.storage cat URL`.
  A tar missing from its prefix or of another size than the manifest says is an error that names
  both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from laionbuild.project.layout import part_dir
from laionbuild.recipe.errors import MissingInputError

MANIFEST = "shards.json"
COMPLETE = "_laionbuild_complete.json"  # in a prefix under download.shards_url: committed, never written again


def is_url(location: str | os.PathLike) -> bool:
    """A remote location (file:// URLs are local paths)."""
    return "://" in str(location) and not str(location).startswith("file://")


def local_path(location: str | os.PathLike) -> str:
    """A local location as a plain path (file:///x -> /x)."""
    return str(location).removeprefix("file://")


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def filesystem(location: str):
    """(fsspec filesystem, path within it) for a URL or a local path. A missing fsspec
    implementation (s3fs, gcsfs…) is an ImportError naming the package to install."""
    import fsspec.core

    return fsspec.core.url_to_fs(str(location))


def open_binary(location: str) -> BinaryIO:
    """A seekable binary file over a local path or an fsspec URL."""
    if not is_url(location):
        return open(local_path(location), "rb")
    # 8 MiB read-ahead blocks: sequential reads (a tar read through) stay cheap, and a reader that
    # keeps many shards open (the report's grids) does not hold s3fs's 50 MiB default for each
    fs, path = filesystem(location)
    return fs.open(path, "rb", block_size=8 << 20)


def webdataset_url(location: str) -> str:
    """`location` as webdataset's gopen takes it: a local path as is, a URL as a `pipe:` that
    streams it through fsspec (webdataset opens only local, http(s), gs and pipe: itself)."""
    if not is_url(location):
        return local_path(location)
    # (the interpreter: the executors' own, PYSPARK_PYTHON, when set; braces stay unquoted for
    # clip_inference's brace expansion, which happens before the shell sees the command)
    python = os.environ.get("PYSPARK_PYTHON") or sys.executable
    return f"pipe:{shlex.quote(python)} -m laionbuild.shards.storage cat {_quote_url(location)}"


def _quote_url(url: str) -> str:
    """Shell-quote a URL but keep `{a..b}` brace patterns outside the quotes."""
    import re

    return "".join(piece if re.fullmatch(r"\{[^{}]*\}", piece) else shlex.quote(piece)
                   for piece in re.split(r"(\{[^{}]*\})", url) if piece)


@dataclass(frozen=True)
class Shard:
    """One img2dataset shard of a downloaded part: the `.tar` at `location` (a local path or a
    URL) and its `.parquet` in the part's directory (always local)."""

    name: str  # the stem, e.g. "00000"
    location: str
    size: int
    parquet: Path

    def open(self) -> BinaryIO:
        return open_binary(self.location)


def part_shards(directory: Path) -> list[Shard]:
    """The shards of a downloaded part (`data/images/part_N`), local or listed by its manifest.
    For a manifest, every listed tar is checked once (one listing of the prefix) to exist with
    its recorded size."""
    from laionbuild.project.atomic import read_json

    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.exists():
        return [Shard(p.stem, str(p), p.stat().st_size, p.with_suffix(".parquet"))
                for p in sorted(directory.glob("*.tar"))]
    listed = read_json(manifest)
    url = listed["url"]
    fs, root = filesystem(url)
    fs.invalidate_cache(root)
    try:
        found = {Path(e["name"]).name: e["size"] for e in fs.ls(root, detail=True)} if listed["shards"] else {}
    except FileNotFoundError:
        found = {}
    shards = []
    for entry in listed["shards"]:
        name, size = entry["name"], entry["size"]
        if found.get(name) != size:
            what = "missing" if name not in found else f"{found[name]} bytes, the manifest says {size}"
            raise MissingInputError(f"{manifest}: shard {join(url, name)} is {what}; the shards under "
                                    f"download.shards_url were removed or changed: delete {url} and rebuild "
                                    f"the part (dvc repro --force download@{directory.name.removeprefix('part_')})")
        location = join(url, name) if is_url(url) else join(local_path(url), name)
        shards.append(Shard(Path(name).stem, location, size, directory / f"{Path(name).stem}.parquet"))
    return shards


def cat(url: str, attempts: int = 3) -> None:
    """Stream `url` to stdout; an error before the first byte is retried (with back-off), one after
    it exits non-zero, which webdataset reports for the shard (and embed then refuses a shard that
    yielded nothing)."""
    import time

    for attempt in range(attempts):
        try:
            f = open_binary(url)
            first = f.read(1 << 20)
            break
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(2 ** attempt)
    with f:
        out = sys.stdout.buffer
        while first:
            out.write(first)
            first = f.read(1 << 20)
    out.flush()


def prefix_fingerprint(cfg, metadata: Path) -> str:
    """Names a part's prefix under download.shards_url: every download setting that changes the
    shards (retry rounds included: they rewrite shards; not the speed knobs of
    recipe.schema.SPEED_KNOBS) and the input, so a complete prefix is never written again."""
    from laionbuild.recipe.schema import without_speed_knobs

    settings = dataclasses.asdict(cfg.download) if dataclasses.is_dataclass(cfg.download) else dict(cfg.download)
    settings = without_speed_knobs(settings, "download")
    settings.pop("shards_url", None)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(metadata.read_bytes())
    return digest.hexdigest()[:16]


def shards_prefix(cfg, part: int) -> str:
    """Where a part's shards go under download.shards_url (its deduped metadata must exist)."""
    return join(cfg.download.shards_url, f"part_{part}-{prefix_fingerprint(cfg, part_dir('dedup', part) / 'metadata.parquet')}")


if __name__ == "__main__":  # python -m laionbuild.shards.storage cat URL (webdataset's pipe:)
    if len(sys.argv) != 3 or sys.argv[1] != "cat":
        sys.exit("usage: python -m laionbuild.shards.storage cat URL")
    cat(sys.argv[2])
