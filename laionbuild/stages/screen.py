"""screen: the downloaded samples of one part that select.image_blocklists names
(`data/screened/part_N/blocked.parquet`: key, list; one row per matched sample and list, in key
order), matched against the hash img2dataset computed of every image it fetched
(`download.compute_hash`, in the part's shard tables), by metadata/blocklists.py.

Its own stage, after the download and beside faces and embed, so that a new version of a list
reruns this join and what reads its output (select, and what follows it) and nothing before:
never the download, the embeddings or the tags. It reads only the shard tables (small files
in the part's directory, also with download.shards_url), never a tar. select drops the matched
keys (rules `image_blocklist_<name>`), so they are in no dataset shard, embedding file, index or
export; the report shows none of them. The download's shards themselves still hold the bytes
(docs/safety.md says how to purge them).
"""

from __future__ import annotations

import logging

import duckdb

from laionbuild.metadata.blocklists import screen_part
from laionbuild.metadata.rules import sql_string
from laionbuild.project.atomic import atomic_dir
from laionbuild.project.funnel import Counts
from laionbuild.project.layout import part_dir
from laionbuild.project.outputs import SCREENED_FILE

log = logging.getLogger(__name__)


def run(cfg, part: int) -> None:
    tables = sorted(part_dir("download", part).glob("*.parquet"))
    con = duckdb.connect()
    blocked, found = screen_part(con, cfg, tables, part)
    with atomic_dir(part_dir("screen", part)) as out:
        con.execute(f"COPY {blocked} TO {sql_string(out / SCREENED_FILE)} (FORMAT parquet)")
        Counts().save(out, image_blocklists=found)
    log.info("screened part %d: %s", part, {f["name"]: f["matched_samples"] for f in found})
