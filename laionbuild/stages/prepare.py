"""prepare: source rows -> canonical metadata for one part (`data/prepared/part_N/`).

Canonical columns `key` (stable, unique: 5-digit part + 9-digit source row), `url`, `caption`
and whichever of sample_id/width/height/license/nsfw/similarity the source maps; every other
source column is kept (renamed `source_<name>` if it would collide). Then dedup on
`prepare.dedup_keys` (first occurrence wins) and the NSFW policy. Runs in DuckDB in-process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from ..atomic import atomic_dir, read_json
from ..funnel import Counts
from ..layout import part_dir

log = logging.getLogger(__name__)
KEY_DIGITS = 9


def make_key(part: int, row: int) -> str:
    return f"{part:05d}{row:0{KEY_DIGITS}d}"


def read_source_file(path: Path, fmt: str) -> pa.Table:
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt in ("csv", "tsv"):
            delimiter = "," if fmt == "csv" else "\t"
            return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True))
        if fmt == "jsonl":
            return pajson.read_json(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: cannot read as {fmt}: {exc}") from None
    raise ValueError(f"unknown source.format {fmt}")


def canonicalize(table: pa.Table, columns: dict, path: Path, part: int) -> pa.Table:
    """Rename mapped source columns to canonical names, keep the others, add `key`."""
    missing = [f"{canonical} <- {src}" for canonical, src in columns.items() if src not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (source.columns); "
                         f"the file has {table.column_names}")
    renamed = {src: canonical for canonical, src in columns.items()}
    taken = set(columns) | {"key"}
    names = []
    for name in table.column_names:
        if name in renamed:
            names.append(renamed[name])
        elif name in taken:
            names.append(f"source_{name}")
        else:
            names.append(name)
    table = table.rename_columns(names)
    for canonical in ("url", "caption"):
        if not pa.types.is_string(table.schema.field(canonical).type) and not pa.types.is_large_string(
                table.schema.field(canonical).type):
            raise ValueError(f"{path}: column `{columns[canonical]}` (source.columns.{canonical}) must hold "
                             f"strings, found {table.schema.field(canonical).type}")
    keys = pa.array([make_key(part, i) for i in range(table.num_rows)], pa.string())
    return table.add_column(0, "key", keys)


def run(cfg, part: int) -> None:
    raw_dir = part_dir("fetch", part)
    fetched = read_json(raw_dir / "fetch.json")
    path = raw_dir / fetched["file"]
    table = canonicalize(read_source_file(path, cfg.source.format), dict(cfg.source.columns), path, part)

    counts = Counts()
    counts.set("rows_in", table.num_rows)
    con = duckdb.connect()
    con.register("source_rows", table)
    con.execute("CREATE TEMP TABLE rows AS SELECT *, row_number() OVER () AS _row FROM source_rows")

    dedup = ", ".join(f'"{k}"' for k in cfg.prepare.dedup_keys if k in table.column_names)
    if dedup:
        # first occurrence (in source row order) of each dedup key wins
        con.execute(f"""CREATE OR REPLACE TEMP TABLE rows AS SELECT * FROM rows
                        QUALIFY row_number() OVER (PARTITION BY {dedup} ORDER BY _row) = 1""")
    counts.set("after_dedup", con.execute("SELECT count(*) FROM rows").fetchone()[0])

    if cfg.prepare.drop_nsfw and "nsfw" in table.column_names:
        # IS DISTINCT FROM keeps rows whose tag is missing (`!=` would drop them silently)
        con.execute("DELETE FROM rows WHERE nsfw IS NOT DISTINCT FROM 'NSFW'")
    counts.set("after_nsfw", con.execute("SELECT count(*) FROM rows").fetchone()[0])

    result = con.execute("SELECT * EXCLUDE (_row) FROM rows ORDER BY _row").arrow()
    if hasattr(result, "read_all"):
        result = result.read_all()
    with atomic_dir(part_dir("prepare", part)) as out:
        pq.write_table(result, out / "metadata.parquet")
        counts.save(out)
    log.info("prepared part %d: %s", part, dict(counts.values))
