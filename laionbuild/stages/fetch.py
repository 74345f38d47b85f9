"""fetch: copy one part of the source's metadata from `source.base_url` (any fsspec URL or a
local path) into `data/raw/part_N/`, recording its size and md5."""

from __future__ import annotations

import hashlib
import logging

import fsspec

from ..atomic import atomic_dir, write_json
from ..layout import part_dir

log = logging.getLogger(__name__)
CHUNK = 8 << 20


def source_url(cfg, part: int) -> str:
    base = cfg.source.base_url.rstrip("/")
    return f"{base}/{cfg.source.part_pattern.format(part=part)}"


def run(cfg, part: int) -> None:
    url = source_url(cfg, part)
    name = url.rsplit("/", 1)[-1]
    with atomic_dir(part_dir("fetch", part)) as out:
        md5 = hashlib.md5()
        size = 0
        try:
            with fsspec.open(url, "rb") as src, open(out / name, "wb") as dst:
                while chunk := src.read(CHUNK):
                    md5.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"source part {part} not found at {url} (source.base_url + source.part_pattern)") from None
        write_json(out / "fetch.json", {"url": url, "file": name, "size": size, "md5": md5.hexdigest()})
    log.info("fetched part %d: %s (%d bytes)", part, url, size)
