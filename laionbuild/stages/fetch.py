"""fetch: copy one part of the source's metadata from `source.base_url` (any fsspec URL or a
local path; or the consolidated parts) into `data/raw/part_N/`, resumably
(`laionbuild.metadata.transfer`), recording size and md5."""

from __future__ import annotations

import hashlib
import logging

from laionbuild.metadata.sources import source_files
from laionbuild.metadata.transfer import fetch_file
from laionbuild.project.atomic import atomic_dir, write_json
from laionbuild.project.layout import CONSOLIDATED, WORK, part_dir
from laionbuild.recipe.errors import InputError, MissingInputError

log = logging.getLogger(__name__)


def source_url(cfg, part: int) -> str:
    """Where part N of the build comes from: a consolidated part, the N-th file of
    `source.files`, or base_url + part_pattern."""
    if cfg.source.consolidate_parts:
        return str(CONSOLIDATED / f"part-{part:05d}.parquet")
    if cfg.source.files:
        files = source_files(cfg)
        if part >= len(files):
            raise MissingInputError(f"source.files `{cfg.source.files}` matches {len(files)} files in "
                                    f"{cfg.source.base_url}; part {part} has none")
        return files[part]
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
        record = {**info, "file": name}
        emb_url = image_embeddings_url(cfg, part)
        if emb_url:
            emb_name = emb_url.rsplit("/", 1)[-1]
            if emb_name == name:
                raise InputError(f"source.image_embeddings `{cfg.source.image_embeddings}` names the metadata "
                                 f"file itself ({name})")
            emb_info = fetch_file(emb_url, out / emb_name, work / f"{emb_name}.partial",
                                  retries=cfg.source.fetch_retries, backoff=cfg.source.fetch_backoff_s)
            record["image_embeddings"] = {**emb_info, "file": emb_name}
        write_json(out / "fetch.json", record)
    log.info("fetched part %d: %s (%d bytes)", part, url, info["size"])


def image_embeddings_url(cfg, part: int) -> str | None:
    """Where part N's precomputed image embeddings are (source.image_embeddings), or None."""
    if not cfg.source.image_embeddings:
        return None
    return f"{cfg.source.base_url.rstrip('/')}/{cfg.source.image_embeddings.format(part=part)}"
