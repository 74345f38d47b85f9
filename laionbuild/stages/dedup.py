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
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild.engine.spark import spark_session, spark_to_arrow
from laionbuild.engine.sql import DUCKDB, SPARK, SqlDialect
from laionbuild.metadata.rules import sql_string
from laionbuild.project.atomic import atomic_dir
from laionbuild.project.funnel import Counts
from laionbuild.project.layout import DEDUPED, TMP, part_dir
from laionbuild.project.partwise import folder_digest, write_manifest

log = logging.getLogger(__name__)


def survivors_sql(cfg, dialect: SqlDialect) -> str:
    """`all_rows` (with `_part_rank`) -> the surviving keys (and merged `captions`), on Spark.
    The window only touches the dedup keys, so memory follows those columns, not whole rows.
    (The local engine aggregates row positions instead: `_survivors_by_part`.)"""
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
        # what the per-kind graph's stages depend on instead of the folder (project/partwise.py)
        write_manifest(out, {part: folder_digest(target.parent) for part, target in zip(parts, targets)})


def _run_duckdb(cfg, sources, targets) -> None:
    spill = TMP / "duckdb"
    shutil.rmtree(spill, ignore_errors=True)
    spill.mkdir(parents=True)
    con = duckdb.connect(config={"memory_limit": cfg.dedup.memory_limit, "temp_directory": str(spill / "duckdb")})
    selects = [f"SELECT * FROM read_parquet({sql_string(path)})" for path in sources]
    union = con.execute(f"DESCRIBE {' UNION ALL BY NAME '.join(selects)}").fetchall()
    union = [(n, t) for n, t, *_ in union]
    if cfg.dedup.keys:
        _survivors_by_part(cfg, con, sources, spill)
    con.execute(f"SET threads = {int(cfg.engine.write_threads)}")  # see engine.write_threads
    for rank, (path, target) in enumerate(zip(sources, targets)):
        con.execute(f"CREATE OR REPLACE TEMP VIEW part_rows AS SELECT * FROM read_parquet({sql_string(path)})")
        own = {row[0] for row in con.execute("DESCRIBE part_rows").fetchall()}
        columns = _columns(union, own, DUCKDB)
        if not cfg.dedup.keys:  # a scan keeps the part's (key) order
            con.execute(f"COPY (SELECT {columns} FROM part_rows p) TO {sql_string(target)} (FORMAT parquet)")
            continue
        # One flag per row of the part, by position, built from the survivors' positions; the
        # part's rows are streamed beside their flags: the whole rows are never sorted or held.
        # (A parquet file, not a registered Arrow table: registering imports pyarrow.dataset and
        # pandas, half a second.)
        flags = spill / f"flags_{rank}.parquet"
        pq.write_table(_flags(cfg, spill / "survivors", rank, pq.read_metadata(path).num_rows), flags)
        captions = ", f.captions" if cfg.dedup.merge_captions else ""
        con.execute(f"""COPY (SELECT {columns}{captions} FROM part_rows p POSITIONAL JOIN read_parquet({sql_string(flags)}) f
                              WHERE f.keep) TO {sql_string(target)} (FORMAT parquet)""")
        flags.unlink()
    con.close()
    shutil.rmtree(spill, ignore_errors=True)


def _flags(cfg, survivors: Path, rank: int, num_rows: int) -> pa.Table:
    """`keep` (and, with merge_captions, `captions`) for each row of part `rank`, by position.
    Built from Arrow buffers: `pa.array` and `to_numpy` would import pandas."""
    files = sorted(survivors.glob(f"*/_part_rank={rank}/*.parquet"))
    kept = pa.concat_tables([pq.ParquetFile(f).read() for f in files]).combine_chunks() if files else None
    keep = np.zeros(num_rows, dtype=bool)
    positions = np.zeros(0, dtype=np.int64)
    if kept is not None and kept.num_rows:
        column = kept.column("_pos").chunk(0)
        positions = np.frombuffer(column.buffers()[1], dtype=np.int64)[column.offset:column.offset + len(column)]
        keep[positions] = True
    columns = [pa.Array.from_buffers(pa.bool_(), num_rows, [None, pa.py_buffer(np.packbits(keep, bitorder="little"))])]
    names = ["keep"]
    if cfg.dedup.merge_captions:
        index = np.zeros(num_rows, dtype=np.int64)
        index[positions] = np.arange(len(positions))
        indices = pa.Array.from_buffers(pa.int64(), num_rows, [columns[0].buffers()[1], pa.py_buffer(index)])
        values = (kept.column("captions").chunk(0) if kept is not None and kept.num_rows
                  else pa.nulls(0, pa.list_(pa.string())))
        columns.append(values.take(indices))
        names.append("captions")
    return pa.Table.from_arrays(columns, names=names)


def _check_key_order(path: Path) -> None:
    """The prepared part's rows must be in key order: positions then stand for keys (a row's
    position in its part orders rows as its key does)."""
    last = None
    for batch in pq.ParquetFile(path).iter_batches(columns=["key"], batch_size=1 << 20):
        keys = batch.column(0)
        if len(keys) == 0:
            continue
        if (last is not None and keys[0].as_py() < last) or not _sorted(keys):
            raise ValueError(f"{path}: rows are not in key order")
        last = keys[len(keys) - 1].as_py()


def _sorted(keys: pa.Array) -> bool:
    """Whether a string array is in (byte-wise) ascending order. Keys of one width (the rule)
    are compared as fixed-width numpy bytes; pyarrow.compute, slower to import, is the fallback."""
    if len(keys) < 2:
        return True
    if keys.type == pa.string() and keys.null_count == 0:
        offsets = np.frombuffer(keys.buffers()[1], dtype=np.int32)[keys.offset:keys.offset + len(keys) + 1]
        width = int(offsets[1] - offsets[0])
        if width > 0 and offsets[-1] - offsets[0] == width * len(keys) and np.all(np.diff(offsets) == width):
            fixed = np.frombuffer(keys.buffers()[2], dtype=f"S{width}", count=len(keys), offset=int(offsets[0]))
            return bool(np.all(fixed[1:] >= fixed[:-1]))
    import pyarrow.compute as pc

    return pc.all(pc.less_equal(keys.slice(0, len(keys) - 1), keys.slice(1))).as_py()


def _aggregate_size(sources, columns: list[str]) -> tuple[int, int]:
    """(rows, estimated bytes of a hash table of `columns` plus a BIGINT) over the parts, from
    their parquet footers: per row, each column's plain size (dictionary-encoded columns count
    less) plus 16 bytes of DuckDB string header, and 48 of row id, hash and pointers."""
    rows = size = 0
    for path in sources:
        metadata = pq.read_metadata(path)
        rows += metadata.num_rows
        size += 48 * metadata.num_rows
        for i in range(metadata.num_row_groups):
            group = metadata.row_group(i)
            for j in range(group.num_columns):
                column = group.column(j)
                if column.path_in_schema in columns:
                    size += column.total_uncompressed_size + 16 * group.num_rows
    return rows, size


def _memory_limit(con) -> int:
    """DuckDB's memory limit in bytes (0 when it cannot be read)."""
    text = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    units = {"bytes": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    try:
        number, unit = str(text).split()
        return int(float(number) * units[unit.lower()])
    except (ValueError, KeyError):
        return 0


def _survivors_by_part(cfg, con, sources, spill) -> None:
    """The positions (and merged captions) of the surviving rows of the whole build, written
    under `spill/survivors/bucket_B/_part_rank=R/`. A row is identified by its part's rank and
    its position in the part (the parts are in key order, checked), so the first occurrence of
    a dedup key is the smallest (rank, position): a hash aggregate of integers, no sort of
    strings. Rows are first hash-partitioned on the dedup keys into buckets of about
    `dedup.bucket_rows` rows (equal keys land in one bucket), and each bucket is deduplicated on
    its own: linear in the build's size, each aggregate fits in memory (DuckDB spills beyond
    `dedup.memory_limit`)."""
    for path in sources:
        _check_key_order(path)
    needed = [*cfg.dedup.keys] + (["caption"] if cfg.dedup.merge_captions else [])
    rows, table_bytes = _aggregate_size(sources, list(dict.fromkeys(needed)))
    # about `dedup.bucket_rows` rows a bucket, and fewer where a bucket's aggregate would not fit
    # a third of DuckDB's memory limit (beyond it the aggregate spills: several times slower)
    budget = _memory_limit(con) // 3
    buckets = max(1, -(-rows // cfg.dedup.bucket_rows), -(-table_bytes // budget) if budget else 1)
    keys = ", ".join(DUCKDB.quote(k) for k in cfg.dedup.keys)
    columns = ", ".join(DUCKDB.quote(c) for c in dict.fromkeys(needed))
    selects = []
    for rank, path in enumerate(sources):
        names = pq.read_schema(path).names
        # (rank, position) as one BIGINT: positions stay below 2**32 (a part holds < 10**9 rows)
        if "file_row_number" in names:  # read_parquet cannot add its row number beside such a column
            position, source = "row_number() OVER () - 1", f"read_parquet({sql_string(path)})"
        else:
            position, source = "file_row_number", f"read_parquet({sql_string(path)}, file_row_number=true)"
        selects.append(f"SELECT {columns}, {rank} * 4294967296 + {position} AS _id FROM {source}")
    con.execute(f"CREATE OR REPLACE TEMP VIEW all_rows AS {' UNION ALL BY NAME '.join(selects)}")
    if buckets == 1:
        con.execute(f"CREATE TEMP VIEW bucket_rows AS SELECT {columns}, _id FROM all_rows")
        bucket_sources = [None]
    else:
        con.execute(f"""COPY (SELECT {columns}, _id, hash({keys}) % {buckets} AS _bucket FROM all_rows)
                        TO {sql_string(spill / 'buckets')} (FORMAT parquet, PARTITION_BY (_bucket))""")
        bucket_sources = sorted((spill / "buckets").glob("_bucket=*"))
    (spill / "survivors").mkdir()
    captions = ""
    if cfg.dedup.merge_captions:  # in (rank, position) order, NULLs skipped: as DUCKDB.collect_list
        captions = ", list(caption ORDER BY _id) FILTER (WHERE caption IS NOT NULL) AS captions"
    for i, directory in enumerate(bucket_sources):
        if directory is not None:
            con.execute(f"CREATE OR REPLACE TEMP VIEW bucket_rows AS SELECT {columns}, _id FROM "
                        f"read_parquet({sql_string(directory / '*.parquet')})")
        con.execute(f"""COPY (SELECT min(_id) // 4294967296 AS _part_rank, min(_id) % 4294967296 AS _pos{captions}
                              FROM bucket_rows GROUP BY {keys})
                        TO {sql_string(spill / 'survivors' / f'bucket_{i}')} (FORMAT parquet, PARTITION_BY (_part_rank))""")
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
