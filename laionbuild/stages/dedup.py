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


def survivors_sql(cfg, dialect: SqlDialect) -> str:
    """`all_rows` (with `_part_rank`) -> the surviving keys (and merged `captions`). The window
    only touches the dedup keys, so memory follows those columns, not whole rows. (A GROUP BY
    with min() is faster in memory but, at 10M rows under a 512MB limit, DuckDB's aggregate
    runs out of memory where the window spills.)"""
    keys = ", ".join(dialect.quote(k) for k in cfg.dedup.keys)
    window = f"PARTITION BY {keys} ORDER BY _part_rank, key"
    captions = ""
    if cfg.dedup.merge_captions:
        captions = (f", {dialect.collect_list('caption')} OVER ({window} ROWS BETWEEN UNBOUNDED PRECEDING AND "
                    f"UNBOUNDED FOLLOWING) AS captions")
    return (f"SELECT key{', captions' if captions else ''} FROM ("
            f"SELECT key, row_number() OVER ({window}) AS _rn{captions} FROM all_rows) t WHERE _rn = 1")


def _columns(union: list[tuple[str, str]], own: set[str], dialect: SqlDialect) -> str:
    """The union of all parts' columns, NULL where this part lacks one."""
    q = dialect.quote
    return ", ".join(f"p.{q(n)}" if n in own else f"CAST(NULL AS {t}) AS {q(n)}" for n, t in union)


def spark_part_sql(cfg, union: list[tuple[str, str]], own: set[str]) -> str:
    """`part_rows` (one part) -> its surviving rows in key order."""
    columns = _columns(union, own, SPARK)
    if not cfg.dedup.keys:
        return f"SELECT {columns} FROM part_rows p ORDER BY p.key"
    captions = ", s.captions" if cfg.dedup.merge_captions else ""
    return f"SELECT {columns}{captions} FROM part_rows p JOIN survivors s ON p.key = s.key ORDER BY p.key"


def run(cfg) -> None:
    parts = list(cfg.subset.parts)
    sources = [part_dir("prepare", p) / "metadata.parquet" for p in parts]
    with atomic_dir(DEDUPED) as out:
        targets = []
        for part in parts:
            (out / f"part_{part}").mkdir()
            targets.append(out / f"part_{part}" / "metadata.parquet")
        if cfg.engine.name == "spark":
            _run_spark(cfg, sources, targets)
        else:
            _run_duckdb(cfg, sources, targets)
        for part, target in zip(parts, targets):
            counts = Counts()
            counts.set("after_dedup", pq.read_metadata(target).num_rows)
            counts.save(target.parent)
            log.info("dedup part %d: %d rows kept", part, counts.values["after_dedup"])


def _run_duckdb(cfg, sources, targets) -> None:
    spill = TMP / "duckdb"
    shutil.rmtree(spill, ignore_errors=True)
    spill.mkdir(parents=True)
    con = duckdb.connect(config={"memory_limit": cfg.dedup.memory_limit, "temp_directory": str(spill / "duckdb")})
    selects = [f"SELECT *, {rank} AS _part_rank FROM read_parquet({sql_string(path)})"
               for rank, path in enumerate(sources)]
    con.execute(f"CREATE TEMP VIEW all_rows AS {' UNION ALL BY NAME '.join(selects)}")
    union = [(n, t) for n, t, *_ in con.execute("DESCRIBE all_rows").fetchall() if n != "_part_rank"]
    if cfg.dedup.keys:
        _survivors_by_part(cfg, con, sources, spill)
    con.execute(f"SET threads = {int(cfg.engine.write_threads)}")  # see engine.write_threads
    for path, target in zip(sources, targets):
        con.execute(f"CREATE OR REPLACE TEMP VIEW part_rows AS SELECT * FROM read_parquet({sql_string(path)})")
        own = {row[0] for row in con.execute("DESCRIBE part_rows").fetchall()}
        columns = _columns(union, own, DUCKDB)
        if not cfg.dedup.keys:  # a scan keeps the part's (key) order
            con.execute(f"COPY (SELECT {columns} FROM part_rows p) TO {sql_string(target)} (FORMAT parquet)")
            continue
        prefix = con.execute("SELECT substr(min(key), 1, 5) FROM part_rows").fetchone()[0]
        files = sorted(str(f) for f in (spill / "survivors").glob(f"*/_p={prefix}/*.parquet"))
        survivors = (f"read_parquet([{', '.join(sql_string(f) for f in files)}])" if files else
                     f"(SELECT NULL::VARCHAR AS key{', NULL::VARCHAR[] AS captions' if cfg.dedup.merge_captions else ''} "
                     "WHERE false)")
        # One flag per row of the part, in key order (a sort of keys and flags only), then the
        # part's rows streamed beside their flags by position: the whole rows are never sorted
        # or held. The prepared part is in key order; a misaligned row stops the stage.
        captions = ", s.captions" if cfg.dedup.merge_captions else ""
        con.execute(f"""CREATE OR REPLACE TEMP TABLE flags AS
                        SELECT p.key, s.key IS NOT NULL AS keep{captions} FROM part_rows p
                        LEFT JOIN {survivors} s ON p.key = s.key ORDER BY p.key""")
        misaligned = sql_string(f"{path}: rows are not in key order")
        con.execute(f"""COPY (SELECT {columns}{', f.captions' if captions else ''} FROM part_rows p POSITIONAL JOIN flags f
                              WHERE CASE WHEN p.key IS DISTINCT FROM f.key THEN error({misaligned}) ELSE f.keep END)
                        TO {sql_string(target)} (FORMAT parquet)""")
    con.close()
    shutil.rmtree(spill, ignore_errors=True)


def _survivors_by_part(cfg, con, sources, spill) -> None:
    """The surviving keys (and merged captions) of the whole build, written under
    `spill/survivors/bucket_B/_p=PPPPP/` (PPPPP: the part prefix of the key). Rows are first
    hash-partitioned on the dedup keys into buckets of about `dedup.bucket_rows` rows (equal keys
    land in one bucket), and each bucket is deduplicated on its own: linear in the build's size,
    each window fits in memory."""
    rows = sum(pq.read_metadata(path).num_rows for path in sources)
    buckets = max(1, -(-rows // cfg.dedup.bucket_rows))
    keys = ", ".join(DUCKDB.quote(k) for k in cfg.dedup.keys)
    needed = ["key", "_part_rank", *cfg.dedup.keys] + (["caption"] if cfg.dedup.merge_captions else [])
    columns = ", ".join(DUCKDB.quote(c) for c in dict.fromkeys(needed))
    if buckets == 1:
        con.execute(f"CREATE TEMP VIEW bucket_rows AS SELECT {columns} FROM all_rows")
        bucket_sources = [None]
    else:
        con.execute(f"""COPY (SELECT {columns}, hash({keys}) % {buckets} AS _bucket FROM all_rows)
                        TO {sql_string(spill / 'buckets')} (FORMAT parquet, PARTITION_BY (_bucket))""")
        bucket_sources = sorted((spill / "buckets").glob("_bucket=*"))
    (spill / "survivors").mkdir()
    for i, directory in enumerate(bucket_sources):
        if directory is not None:
            con.execute(f"CREATE OR REPLACE TEMP VIEW bucket_rows AS SELECT {columns} FROM "
                        f"read_parquet({sql_string(directory / '*.parquet')})")
        survivors = survivors_sql(cfg, DUCKDB).replace("FROM all_rows", "FROM bucket_rows")
        con.execute(f"""COPY (SELECT *, substr(key, 1, 5) AS _p FROM ({survivors}))
                        TO {sql_string(spill / 'survivors' / f'bucket_{i}')} (FORMAT parquet, PARTITION_BY (_p))""")
        if directory is not None:
            shutil.rmtree(directory)


def _run_spark(cfg, sources, targets) -> None:
    from pyspark.sql import functions as F

    spark = spark_session(cfg.engine)
    frames = [spark.read.parquet(str(path.resolve())) for path in sources]
    union = reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True),
                   [f.withColumn("_part_rank", F.lit(rank)) for rank, f in enumerate(frames)])
    union.createOrReplaceTempView("all_rows")
    survivors = None
    if cfg.dedup.keys:
        survivors = spark.sql(survivors_sql(cfg, SPARK)).cache()
        survivors.createOrReplaceTempView("survivors")
    columns = [(f.name, f.dataType.simpleString()) for f in union.schema.fields if f.name != "_part_rank"]
    for frame, target in zip(frames, targets):
        frame.createOrReplaceTempView("part_rows")
        pq.write_table(spark_to_arrow(spark.sql(spark_part_sql(cfg, columns, set(frame.columns)))), target)
    if survivors is not None:
        survivors.unpersist()
