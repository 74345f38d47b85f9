"""dedup: drop duplicates across all parts of the build, deterministically: the first
occurrence in part order (subset.parts), then key order, wins. Writes every part's surviving
rows to `data/deduped/part_N/`; a part whose rows did not change keeps a byte-identical output,
so adding a later part reruns nothing downstream of the earlier ones.

With `dedup.merge_captions` the captions of merged rows are kept (in order) in `captions`.
The local engine (DuckDB) spills to `data/.tmp/duckdb` beyond `dedup.memory_limit`, so a
global dedup of hundreds of millions of rows fits one machine; `engine=spark` runs the same
query on Spark."""

from __future__ import annotations

import logging
import shutil
from functools import reduce

import duckdb
import pyarrow.parquet as pq

from ..atomic import atomic_dir
from ..engines import DUCKDB, SPARK, SqlDialect, spark_session, spark_to_arrow
from ..funnel import Counts
from ..layout import DEDUPED, TMP, part_dir
from ..rules import sql_string

log = logging.getLogger(__name__)


def kept_sql(cfg, columns: list[str], dialect: SqlDialect) -> str:
    """`all_rows` (with `_part_rank`) -> the surviving rows, same columns (+ `captions`)."""
    q = dialect.quote
    select = ", ".join([q(c) for c in columns] + ["_part_rank"])
    keys = ", ".join(q(k) for k in cfg.dedup.keys)
    if not keys:
        return f"SELECT {select} FROM all_rows"
    window = f"PARTITION BY {keys} ORDER BY _part_rank, key"
    captions = ""
    if cfg.dedup.merge_captions:
        captions = (f", {dialect.collect_list('caption')} OVER ({window} ROWS BETWEEN UNBOUNDED PRECEDING AND "
                    f"UNBOUNDED FOLLOWING) AS captions")
    inner = f"SELECT *, row_number() OVER ({window}) AS _rn{captions} FROM all_rows"
    return f"SELECT {select}{', captions' if captions else ''} FROM ({inner}) t WHERE _rn = 1"


def run(cfg) -> None:
    parts = list(cfg.subset.parts)
    sources = [part_dir("prepare", p) / "metadata.parquet" for p in parts]
    with atomic_dir(DEDUPED) as out:
        targets = []
        for part in parts:
            (out / f"part_{part}").mkdir()
            targets.append(out / f"part_{part}" / "metadata.parquet")
        if cfg.engine.name == "spark":
            kept = _run_spark(cfg, sources, targets)
        else:
            kept = _run_duckdb(cfg, sources, targets)
        for part, target, n in zip(parts, targets, kept):
            counts = Counts()
            counts.set("after_dedup", n)
            counts.save(target.parent)
            log.info("dedup part %d: %d rows kept", part, n)


def _run_duckdb(cfg, sources, targets) -> list[int]:
    spill = TMP / "duckdb"
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"memory_limit": cfg.dedup.memory_limit, "temp_directory": str(spill)})
    selects = [f"SELECT *, {rank} AS _part_rank FROM read_parquet({sql_string(path)})"
               for rank, path in enumerate(sources)]
    con.execute(f"CREATE TEMP VIEW all_rows AS {' UNION ALL BY NAME '.join(selects)}")
    columns = [c for c in con.execute("SELECT * FROM all_rows LIMIT 0").arrow().schema.names if c != "_part_rank"]
    con.execute(f"CREATE TEMP TABLE kept AS {kept_sql(cfg, columns, DUCKDB)}")
    kept = []
    for rank, target in enumerate(targets):
        con.execute(f"""COPY (SELECT * EXCLUDE (_part_rank) FROM kept WHERE _part_rank = {rank} ORDER BY key)
                        TO {sql_string(target)} (FORMAT parquet)""")
        kept.append(con.execute(f"SELECT count(*) FROM kept WHERE _part_rank = {rank}").fetchone()[0])
    shutil.rmtree(spill, ignore_errors=True)
    return kept


def _run_spark(cfg, sources, targets) -> list[int]:
    from pyspark.sql import functions as F

    spark = spark_session(cfg.engine)
    frames = [spark.read.parquet(str(path.resolve())).withColumn("_part_rank", F.lit(rank))
              for rank, path in enumerate(sources)]
    union = reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), frames)
    union.createOrReplaceTempView("all_rows")
    columns = [c for c in union.columns if c != "_part_rank"]
    kept_frame = spark.sql(kept_sql(cfg, columns, SPARK)).cache()
    kept_frame.createOrReplaceTempView("kept")
    kept = []
    for rank, target in enumerate(targets):
        table = spark_to_arrow(spark.sql(f"SELECT * FROM kept WHERE _part_rank = {rank} ORDER BY key").drop("_part_rank"))
        pq.write_table(table, target)
        kept.append(table.num_rows)
    kept_frame.unpersist()
    return kept
