"""download: img2dataset fetches and resizes the images of one part into webdataset shards
(`data/images/part_N/NNNNN.tar` + `.parquet` + `_stats.json`).

Resume: img2dataset works in `data/.work/download/part_N-<fingerprint>/` in incremental mode, so
a killed run continues from the shards it finished; the fingerprint (params + input checksum)
keeps a changed recipe from resuming stale work. Only a finished part is moved into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_dir, read_json
from ..funnel import Counts
from ..layout import WORK, part_dir
from ..local_server import serve_folder
from ..url_policy import refusals, spread_by_host

log = logging.getLogger(__name__)
KEY_COLUMN = "laionbuild_key"  # our key, carried through img2dataset as an additional column


def _fingerprint(cfg, metadata: Path) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([_i2d_settings(cfg), cfg.download.allow_private_urls], sort_keys=True).encode())
    digest.update(metadata.read_bytes())
    return digest.hexdigest()[:16]


def _i2d_settings(cfg) -> dict:
    d = cfg.download
    return dict(
        image_size=d.image_size,
        resize_mode=d.resize_mode,
        encode_format=d.encode_format,
        encode_quality=d.encode_quality,
        number_sample_per_shard=d.number_sample_per_shard,
        processes_count=d.processes_count,
        thread_count=d.thread_count,
        timeout=d.timeout,
        retries=d.retries,
        min_image_size=d.min_image_size,
        max_aspect_ratio=float("inf") if d.max_aspect_ratio is None else d.max_aspect_ratio,
        compute_hash=d.compute_hash,
    )


def _rewrite(urls: list[str], host: str | None, base: str | None) -> list[str]:
    if not host:
        return urls
    served = urlsplit(base)
    out = []
    for url in urls:
        parts = urlsplit(url)
        if parts.hostname == host:
            parts = parts._replace(scheme=served.scheme, netloc=served.netloc)
        out.append(urlunsplit(parts))
    return out


def shard_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*.tar"))


def run(cfg, part: int) -> None:
    import img2dataset

    metadata_path = part_dir("dedup", part) / "metadata.parquet"
    table = pq.read_table(metadata_path, columns=["key", "url", "caption"])
    work = WORK / "download" / f"part_{part}-{_fingerprint(cfg, metadata_path)}"
    shards = work / "shards"
    work.mkdir(parents=True, exist_ok=True)

    server = cfg.download.local_server
    context = serve_folder(server.root) if server.host else nullcontext(None)
    counts = Counts()
    with context as base_url:
        urls = _rewrite(table.column("url").to_pylist(), server.host, base_url)
        reasons = refusals(urls, cfg.download.allow_private_urls)
        allowed = pa.array([r is None for r in reasons])
        for reason in set(filter(None, reasons)):
            counts.fail(reason, reasons.count(reason))
        fetch_table = pa.table({"url": urls, "caption": table.column("caption"),
                                KEY_COLUMN: table.column("key")}).filter(allowed)
        # politeness: one host's URLs spread over the run instead of arriving in a burst
        fetch_table = fetch_table.take(pa.array(spread_by_host(fetch_table.column("url").to_pylist()), pa.int64()))
        input_path = work / "input.parquet"
        pq.write_table(fetch_table, input_path)
        if fetch_table.num_rows:
            img2dataset.download(
                url_list=str(input_path),
                input_format="parquet",
                url_col="url",
                caption_col="caption",
                save_additional_columns=[KEY_COLUMN],
                output_folder=str(shards),
                output_format="webdataset",
                incremental_mode="incremental",
                distributor="multiprocessing",
                enable_wandb=False,
                **_i2d_settings(cfg),
            )

    counts.set("download_attempted", table.num_rows)
    counts.set("refused_by_url_policy", table.num_rows - fetch_table.num_rows)
    ok = 0
    stats_files = sorted(shards.glob("*_stats.json")) if fetch_table.num_rows else []
    expected = -(-fetch_table.num_rows // cfg.download.number_sample_per_shard)
    if len(stats_files) != expected:
        raise RuntimeError(f"download of part {part} incomplete: {len(stats_files)}/{expected} shards have stats "
                           f"in {shards}; rerun to resume")
    for stats_path in stats_files:
        stats = read_json(stats_path)
        ok += stats["successes"]
        for reason, n in stats["status_dict"].items():
            if reason != "success":
                counts.fail(reason, n)
    counts.set("downloaded_ok", ok)
    counts.set("download_failed", table.num_rows - ok)

    with atomic_dir(part_dir("download", part)) as out:
        for path in sorted(shards.iterdir()) if fetch_table.num_rows else []:
            if path.suffix in (".tar", ".parquet") or path.name.endswith("_stats.json"):
                os.link(path, out / path.name)  # the work dir stays whole until the part is in place
        counts.save(out)
    shutil.rmtree(work, ignore_errors=True)
    log.info("downloaded part %d: %d/%d ok", part, ok, table.num_rows)
