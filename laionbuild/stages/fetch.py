"""fetch: copy one part of the source's metadata from `source.base_url` (any fsspec URL or a
local path; or the consolidated parts) into `data/raw/part_N/`, resumably
(`laionbuild.metadata.transfer`), recording size and md5."""

from __future__ import annotations

import hashlib
import json
import logging

from laionbuild.metadata.sources import image_embeddings_url, source_url
from laionbuild.metadata.transfer import fetch_file
from laionbuild.project.atomic import atomic_dir, write_json
from laionbuild.project.inputs import recorded
from laionbuild.project.layout import WORK, part_dir
from laionbuild.recipe.errors import InputError

log = logging.getLogger(__name__)


def run(cfg, part: int) -> None:
    url = source_url(cfg, part)
    name = url.rsplit("/", 1)[-1]
    # the partial file survives a killed run and is resumed; keyed by URL and by the part's
    # fingerprint (the inputs stage's), so a new source or a republished file starts afresh
    key = url + json.dumps(recorded(f"source/part_{part}.json"), sort_keys=True)
    work = WORK / "fetch" / f"part_{part}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
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
