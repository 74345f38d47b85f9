"""prepare: source rows -> canonical, filtered metadata for one part (`data/prepared/part_N/`).

Canonical columns: `key` (stable, unique: 5-digit part + 9-digit source row), `url`, `caption`
and whichever of sample_id/width/height/license/nsfw/similarity the source maps; every other
source column is kept (renamed `source_<name>` if it would collide). Then the `prepare` rules
(source.ids_url id list, NSFW policy, similarity, caption length, language, size, aspect ratio), each counted. Dedup
across parts is the global `dedup` stage that follows. Runs in DuckDB in-process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from laionbuild.engine.spark import spark_session, spark_to_arrow
from laionbuild.engine.sql import DUCKDB, SPARK, SqlDialect
from laionbuild.metadata import blocklists
from laionbuild.metadata.rules import count, metadata_rules, sql_string, where
from laionbuild.metadata.sources import (
    canonical_columns,
    duckdb_source,
    effective_source,
    language_settings,
    part_ids,
    rows_sql,
    source_schema,
)
from laionbuild.project.atomic import atomic_dir, read_json
from laionbuild.project.funnel import Counts
from laionbuild.project.layout import part_dir
from laionbuild.recipe.errors import InputError

log = logging.getLogger(__name__)


def run(cfg, part: int) -> None:
    raw_dir = part_dir("fetch", part)
    path = raw_dir / read_json(raw_dir / "fetch.json")["file"]
    columns, aliases, fmt = effective_source(cfg)
    schema, num_rows, arrow = source_schema(path, fmt)
    if num_rows == 0:
        raise InputError(f"{path}: part {part} has no rows")
    if num_rows >= 10**9:
        raise InputError(f"{path}: {num_rows} rows; keys hold 9 digits of row number: split the part "
                         "(source.consolidate_parts)")
    pairs = canonical_columns(schema, columns, path, aliases)
    ids = part_ids(cfg, part, pairs, schema)
    engine = _run_spark if cfg.engine.name == "spark" else _run_duckdb
    counts = Counts()
    with atomic_dir(part_dir("prepare", part)) as out:
        extra = engine(cfg, part, path, arrow, ids, pairs, counts, out / "metadata.parquet") or {}
        counts.save(out, **extra)
    log.info("prepared part %d (%s engine): %s", part, cfg.engine.name, dict(counts.values))


def _output_columns(cfg, pairs, dialect: SqlDialect) -> str:
    return ", ".join(["key"] + [dialect.quote(dst) for _, dst in pairs] + (["language"] if cfg.prepare.languages else []))


def _run_duckdb(cfg, part, path, arrow, ids, pairs, counts, target: Path) -> dict | None:
    extra = None
    con = duckdb_source(cfg, path, arrow, ids)
    # a table, not a view, when a UDF is involved: the language is detected once, not per scan
    kind = "TABLE" if cfg.prepare.languages or cfg.prepare.caption_word_list else "VIEW"
    lists = cfg.prepare.blocklists
    con.execute(f"CREATE TEMP {kind} {'canonical_rows' if lists else 'rows'} AS {rows_sql(cfg, part, pairs, DUCKDB)}")
    if lists:  # + a `_blocked_<name>` column per hash list (metadata/blocklists.py)
        extra = {"blocklists": blocklists.apply(con, cfg, "canonical_rows", "rows", part)}
    active = metadata_rules(cfg, set(cfg.source.columns), DUCKDB)
    try:
        count(lambda sql: con.execute(sql).fetchone(), "rows", active, counts, rows_name="rows_in")
        # DuckDB keeps source order through scans, projections and filters (its documented
        # order preservation), so only the id-list and blocklist joins need a sort, which holds
        # the part in memory
        order = " ORDER BY _row" if ids is not None or lists else ""
        con.execute(f"SET threads = {int(cfg.engine.write_threads)}")
        con.execute(f"""COPY (SELECT {_output_columns(cfg, pairs, DUCKDB)} FROM rows WHERE {where(active)}{order})
                        TO {sql_string(target)} (FORMAT parquet)""")
    except duckdb.Error as exc:
        raise InputError(f"{path}: {str(exc).splitlines()[0]}") from None
    return extra


def _run_spark(cfg, part, path, arrow, ids, pairs, counts, target: Path) -> None:
    from pyspark.sql import functions as F

    spark = spark_session(cfg.engine)
    if arrow is None:
        frame = spark.read.parquet(str(path.resolve())).select("*", F.col("_metadata.row_index").alias("_row"))
    else:
        frame = spark.createDataFrame(arrow)
    frame.createOrReplaceTempView("source_rows")
    if ids is not None:
        spark.createDataFrame(ids).createOrReplaceTempView("ids")
    if cfg.prepare.languages:
        from laionbuild.engine.spark_udfs import language_udf

        spark.udf.register("laionbuild_language", language_udf(*language_settings(cfg)))
    spark.sql(rows_sql(cfg, part, pairs, SPARK)).cache().createOrReplaceTempView("rows")
    active = metadata_rules(cfg, set(cfg.source.columns), SPARK)
    count(lambda sql: tuple(spark.sql(sql).collect()[0]), "rows", active, counts, rows_name="rows_in")
    result = spark.sql(f"SELECT {_output_columns(cfg, pairs, SPARK)} FROM rows WHERE {where(active)} ORDER BY _row")
    pq.write_table(spark_to_arrow(result), target)

