"""prepare: source rows -> canonical, filtered metadata for one part (`data/prepared/part_N/`).

Canonical columns: `key` (stable, unique: 5-digit part + 9-digit source row), `url`, `caption`
and whichever of sample_id/width/height/license/nsfw/similarity the source maps; every other
source column is kept (renamed `source_<name>` if it would collide). Then the `prepare` rules
(source.ids_url id list, NSFW policy, similarity, caption length, size, aspect ratio), each counted. Dedup
across parts is the global `dedup` stage that follows. Runs in DuckDB in-process.
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
from ..ids import ids_table
from ..layout import part_dir
from ..rules import Rule, apply, sql_string

log = logging.getLogger(__name__)
KEY_DIGITS = 9
# canonical column -> predicate on its Arrow type, and what to call that type in an error
COLUMN_TYPES = {
    "url": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "strings"),
    "caption": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t), "strings"),
    "nsfw": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t), "strings"),
    "license": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t), "strings"),
    "similarity": (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t), "numbers"),
    "width": (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t), "numbers"),
    "height": (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t), "numbers"),
    "sample_id": (lambda t: pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t),
                  "integers or strings"),
}


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
        raise ValueError(f"{path}: cannot read as {fmt} (corrupt or truncated?): {exc}") from None
    raise ValueError(f"unknown source.format {fmt}")


def canonicalize(table: pa.Table, columns: dict, path: Path, part: int) -> pa.Table:
    """Rename mapped source columns to canonical names, keep the others, add `key`."""
    missing = [f"`{src}` (source.columns.{canonical})" for canonical, src in columns.items()
               if src not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column {', '.join(missing)}; the file has {table.column_names}")
    for canonical, src in columns.items():
        accepts, kind = COLUMN_TYPES[canonical]
        found = table.schema.field(src).type
        if not accepts(found):
            raise ValueError(f"{path}: column `{src}` (source.columns.{canonical}) must hold {kind}, found {found}")
    renamed = {src: canonical for canonical, src in columns.items()}
    taken = set(columns) | {"key", "captions"}
    names = [renamed.get(name, f"source_{name}" if name in taken else name) for name in table.column_names]
    table = table.rename_columns(names)
    keys = pa.array([make_key(part, i) for i in range(table.num_rows)], pa.string())
    return table.add_column(0, "key", keys)


def rules(cfg, columns: set[str]) -> list[Rule]:
    """The metadata filters in funnel order. A rule whose column the source lacks is skipped."""
    p = cfg.prepare
    out: list[Rule] = [("has_url", "url IS NOT NULL AND trim(url) <> ''")]
    if cfg.source.ids_url:
        out.append(("ids", f"{cfg.source.ids_column} IN (SELECT id FROM ids)"))
    if "nsfw" in columns and (p.nsfw.drop or p.nsfw.drop_missing):
        dropped = ", ".join(sql_string(v) for v in p.nsfw.drop) or "NULL"
        # explicit NULL handling: `nsfw NOT IN (...)` alone would silently drop missing tags
        missing = "false" if p.nsfw.drop_missing else "true"
        out.append(("nsfw", f"CASE WHEN nsfw IS NULL THEN {missing} ELSE nsfw NOT IN ({dropped}) END"))
    if p.min_similarity is not None:
        out.append(("min_similarity", f"similarity >= {float(p.min_similarity)!r}"))
    words = "CASE WHEN trim(coalesce(caption, '')) = '' THEN 0 ELSE len(regexp_split_to_array(trim(caption), '\\s+')) END"
    for key, expr, op in (("min_caption_chars", "length(coalesce(caption, ''))", ">="),
                          ("max_caption_chars", "length(coalesce(caption, ''))", "<="),
                          ("min_caption_words", words, ">="), ("max_caption_words", words, "<=")):
        if getattr(p, key) is not None:
            out.append((key, f"{expr} {op} {int(getattr(p, key))}"))
    if p.min_width is not None:
        out.append(("min_width", f"width >= {int(p.min_width)}"))
    if p.min_height is not None:
        out.append(("min_height", f"height >= {int(p.min_height)}"))
    if p.max_aspect_ratio is not None:
        out.append(("max_aspect_ratio", f"least(width, height) > 0 AND "
                                        f"greatest(width, height) <= {float(p.max_aspect_ratio)!r} * least(width, height)"))
    return out


def run(cfg, part: int) -> None:
    raw_dir = part_dir("fetch", part)
    fetched = read_json(raw_dir / "fetch.json")
    path = raw_dir / fetched["file"]
    source = read_source_file(path, cfg.source.format)
    if source.num_rows == 0:
        raise ValueError(f"{path}: part {part} has no rows")
    table = canonicalize(source, dict(cfg.source.columns), path, part)

    counts = Counts()
    counts.set("rows_in", table.num_rows)
    con = duckdb.connect()
    con.register("source_rows", table)
    con.execute("CREATE TEMP TABLE rows AS SELECT * FROM source_rows")
    if cfg.source.ids_url:
        con.register("ids", ids_table(cfg.source.ids_url, part, cfg.source.ids_column,
                                      table.schema.field(cfg.source.ids_column).type))
    apply(con, "rows", rules(cfg, set(table.column_names)), counts)

    result = con.execute("SELECT * FROM rows ORDER BY key").arrow()
    if hasattr(result, "read_all"):
        result = result.read_all()
    with atomic_dir(part_dir("prepare", part)) as out:
        pq.write_table(result, out / "metadata.parquet")
        counts.save(out)
    log.info("prepared part %d: %s", part, dict(counts.values))
