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
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from ..atomic import atomic_dir, read_json
from ..funnel import Counts
from ..ids import ids_table
from ..layout import part_dir
from ..rules import Rule, count, sql_string, where

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


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def source_relation(con, path: Path, fmt: str) -> tuple[str, pa.Schema, int]:
    """(SQL relation with a `_row` column = row number in the file, its schema, its row count).
    Parquet is scanned by DuckDB straight from disk; other formats go through Arrow."""
    try:
        if fmt == "parquet":
            metadata = pq.read_metadata(path)
            schema = metadata.schema.to_arrow_schema()
            relation = f"(SELECT *, file_row_number AS _row FROM read_parquet({sql_string(path)}, file_row_number=true))"
            return relation, schema, metadata.num_rows
        if fmt in ("csv", "tsv"):
            delimiter = "," if fmt == "csv" else "\t"
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True))
        elif fmt == "jsonl":
            table = pajson.read_json(path)
        else:
            raise ValueError(f"unknown source.format {fmt}")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: cannot read as {fmt} (corrupt or truncated?): {exc}") from None
    table = table.append_column("_row", pa.array(np.arange(table.num_rows)))
    con.register("source_file", table)
    return "source_file", table.schema, table.num_rows


def canonical_select(schema: pa.Schema, columns: dict, path: Path, part: int) -> str:
    """SELECT list: mapped source columns under canonical names, the others kept (renamed
    `source_<name>` if they would collide), and `key` (5-digit part + 9-digit file row)."""
    names = [n for n in schema.names if n != "_row"]
    missing = [f"`{src}` (source.columns.{canonical})" for canonical, src in columns.items() if src not in names]
    if missing:
        raise ValueError(f"{path}: missing column {', '.join(missing)}; the file has {names}")
    for canonical, src in columns.items():
        accepts, kind = COLUMN_TYPES[canonical]
        found = schema.field(src).type
        if not accepts(found):
            raise ValueError(f"{path}: column `{src}` (source.columns.{canonical}) must hold {kind}, found {found}")
    renamed = {src: canonical for canonical, src in columns.items()}
    taken = set(columns) | {"key", "captions"}
    select = [f"printf('%05d%0{KEY_DIGITS}d', {int(part)}, _row) AS key"]
    for name in names:
        target = renamed.get(name, f"source_{name}" if name in taken else name)
        select.append(f"{_quote(name)} AS {_quote(target)}")
    return ", ".join(select + ["_row"])


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
    con = duckdb.connect()
    relation, schema, num_rows = source_relation(con, path, cfg.source.format)
    if num_rows == 0:
        raise ValueError(f"{path}: part {part} has no rows")
    columns = dict(cfg.source.columns)
    con.execute(f"CREATE TEMP VIEW rows AS SELECT {canonical_select(schema, columns, path, part)} FROM {relation}")
    if cfg.source.ids_url:
        con.register("ids", ids_table(cfg.source.ids_url, part, cfg.source.ids_column,
                                      schema.field(columns[cfg.source.ids_column]).type))
    active = rules(cfg, set(columns))
    counts = Counts()
    with atomic_dir(part_dir("prepare", part)) as out:
        try:
            count(con, "rows", active, counts, rows_name="rows_in")
            con.execute(f"""COPY (SELECT * EXCLUDE (_row) FROM rows WHERE {where(active)} ORDER BY _row)
                            TO {sql_string(out / 'metadata.parquet')} (FORMAT parquet)""")
        except duckdb.Error as exc:
            raise ValueError(f"{path}: {str(exc).splitlines()[0]}") from None
        counts.save(out)
    log.info("prepared part %d: %s", part, dict(counts.values))
