"""fetch: copy one part of the source's metadata from `source.base_url` (any fsspec URL or a
local path) into `data/raw/part_N/`, resumably (`laionbuild.transfer`), recording size and md5."""

from __future__ import annotations

import hashlib
import logging

from ..atomic import atomic_dir, write_json
from ..layout import WORK, part_dir
from ..transfer import fetch_file

log = logging.getLogger(__name__)


def source_url(cfg, part: int) -> str:
    base = cfg.source.base_url.rstrip("/")
    return f"{base}/{cfg.source.part_pattern.format(part=part)}"


def run(cfg, part: int) -> None:
    url = source_url(cfg, part)
    name = url.rsplit("/", 1)[-1]
    # the partial file survives a killed run and is resumed; keyed by URL so a new source starts afresh
    work = WORK / "fetch" / f"part_{part}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    with atomic_dir(part_dir("fetch", part)) as out:
        info = fetch_file(url, out / name, work / f"{name}.partial", retries=cfg.source.fetch_retries,
                          backoff=cfg.source.fetch_backoff_s)
        write_json(out / "fetch.json", {**info, "file": name})
    log.info("fetched part %d: %s (%d bytes)", part, url, info["size"])
