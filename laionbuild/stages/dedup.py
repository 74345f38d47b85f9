"""dedup: drop duplicates across all parts of the build, deterministically: the first
occurrence in part order (subset.parts), then key order, wins. Writes every part's surviving
rows to `data/deduped/part_N/`; a part whose rows did not change keeps a byte-identical output,
so adding a later part reruns nothing downstream of the earlier ones.

With `dedup.merge_captions` the captions of merged rows are kept (in order) in `captions`.
DuckDB spills to `data/.tmp/duckdb` beyond `dedup.memory_limit`, so a global dedup of hundreds
of millions of rows fits one machine."""

from __future__ import annotations

import logging
import shutil

import duckdb

from ..atomic import atomic_dir
from ..funnel import Counts, load_stats
from ..layout import DEDUPED, TMP, part_dir
from ..rules import sql_string

log = logging.getLogger(__name__)


def run(cfg) -> None:
    parts = list(cfg.subset.parts)
    spill = TMP / "duckdb"
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"memory_limit": cfg.dedup.memory_limit, "temp_directory": str(spill),
                                 "preserve_insertion_order": True})
    selects = [f"SELECT *, {rank} AS _part_rank FROM read_parquet({sql_string(part_dir('prepare', p) / 'metadata.parquet')})"
               for rank, p in enumerate(parts)]
    con.execute(f"CREATE TEMP VIEW all_rows AS {' UNION ALL BY NAME '.join(selects)}")
    keys = ", ".join(f'"{k}"' for k in cfg.dedup.keys)
    if not keys:
        kept = "SELECT * FROM all_rows"
    elif cfg.dedup.merge_captions:
        kept = f"""SELECT * EXCLUDE (_rn) FROM (
                     SELECT *, row_number() OVER w AS _rn,
                            list(caption) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS captions
                     FROM all_rows WINDOW w AS (PARTITION BY {keys} ORDER BY _part_rank, key))
                   WHERE _rn = 1"""
    else:
        kept = f"SELECT * FROM all_rows QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY _part_rank, key) = 1"
    con.execute(f"CREATE TEMP TABLE kept AS {kept}")

    with atomic_dir(DEDUPED) as out:
        for rank, part in enumerate(parts):
            target = out / f"part_{part}"
            target.mkdir()
            con.execute(f"""COPY (SELECT * EXCLUDE (_part_rank) FROM kept WHERE _part_rank = {rank} ORDER BY key)
                            TO {sql_string(target / 'metadata.parquet')} (FORMAT parquet)""")
            counts = Counts()
            counts.set("after_dedup", con.execute(f"SELECT count(*) FROM kept WHERE _part_rank = {rank}").fetchone()[0])
            counts.save(target)
            log.info("dedup part %d: %d of %d rows kept", part, counts.values["after_dedup"],
                     load_stats(part_dir("prepare", part))["counts"]["rows_in"])
    shutil.rmtree(spill, ignore_errors=True)
