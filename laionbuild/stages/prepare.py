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
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_dir, read_json
from ..engines import DUCKDB, SPARK, SqlDialect, spark_session, spark_to_arrow
from ..funnel import Counts
from ..layout import part_dir
from ..recipe.errors import InputError
from ..rules import Rule, count, sql_string, where

log = logging.getLogger(__name__)
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


EXTENSION_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def file_format(path: Path, fmt: str) -> str:
    """`source.format`, or with `auto` the format the file's extension says."""
    if fmt != "auto":
        return fmt
    suffix = Path(str(path).removesuffix(".gz")).suffix.lower()
    if suffix not in EXTENSION_FORMATS:
        raise InputError(f"{path}: source.format=auto cannot tell the format of a `{suffix}` file")
    return EXTENSION_FORMATS[suffix]


def effective_source(cfg) -> tuple[dict, dict, str]:
    """(columns, aliases, format) of the files prepare reads: consolidated parts already have
    canonical column names."""
    if cfg.source.consolidate_parts:
        return {c: c for c in cfg.source.columns}, {}, "parquet"
    return dict(cfg.source.columns), {k: list(v) for k, v in cfg.source.column_aliases.items()}, cfg.source.format


def read_arrow(path: Path, fmt: str) -> pa.Table:
    """A non-parquet source file as Arrow, with `_row` = its row number."""
    import numpy as np
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    fmt = file_format(path, fmt)
    try:
        if fmt in ("csv", "tsv"):
            delimiter = "," if fmt == "csv" else "\t"
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True))
        elif fmt == "jsonl":
            table = pajson.read_json(path)
        else:
            raise InputError(f"unknown source.format {fmt}")
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: cannot read as {fmt} (corrupt or truncated?): {exc}") from None
    return table.append_column("_row", pa.array(np.arange(table.num_rows)))


def source_schema(path: Path, fmt: str) -> tuple[pa.Schema, int, pa.Table | None]:
    """(schema, row count, the Arrow table for non-parquet formats). Parquet is only opened
    for its footer here; the engine scans it."""
    if file_format(path, fmt) == "parquet":
        try:
            metadata = pq.read_metadata(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: cannot read as parquet (corrupt or truncated?): {exc}") from None
        return metadata.schema.to_arrow_schema(), metadata.num_rows, None
    table = read_arrow(path, fmt)
    return table.schema, table.num_rows, table


def canonical_columns(schema: pa.Schema, columns: dict, path: Path,
                      aliases: dict | None = None) -> list[tuple[str, str]]:
    """(source column, output name): mapped columns get canonical names (the `columns` name,
    else the first of its aliases the file has), the others are kept (renamed
    `source_<name>` if they would collide). Checks presence and types."""
    names = [n for n in schema.names if n != "_row"]
    resolved, missing = {}, []
    for canonical, src in columns.items():
        candidates = [src, *(aliases or {}).get(canonical, [])]
        found = next((c for c in candidates if c in names), None)
        if found is None:
            missing.append(f"`{'`/`'.join(candidates)}` (source.columns.{canonical})")
        resolved[canonical] = found
    if missing:
        raise InputError(f"{path}: missing column {', '.join(missing)}; the file has {names}")
    columns = resolved
    for canonical, src in columns.items():
        accepts, kind = COLUMN_TYPES[canonical]
        found = schema.field(src).type
        if not accepts(found):
            if kind == "strings" and (pa.types.is_binary(found) or pa.types.is_large_binary(found)):
                raise InputError(f"{path}: column `{src}` (source.columns.{canonical}) holds text that is not "
                                 "UTF-8; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
            raise InputError(f"{path}: column `{src}` (source.columns.{canonical}) must hold {kind}, found {found}")
    renamed = {src: canonical for canonical, src in columns.items()}
    taken = set(columns) | {"key", "captions"}
    return [(name, renamed.get(name, f"source_{name}" if name in taken else name)) for name in names]


def rows_sql(cfg, part: int, pairs: list[tuple[str, str]], dialect: SqlDialect) -> str:
    """`source_rows` -> canonical rows with `key`, `_row` and, with an id list, `_in_ids`."""
    q = dialect.quote
    select = ", ".join([f"{dialect.key(part, '_row')} AS key"] + [f"{q(src)} AS {q(dst)}" for src, dst in pairs]
                       + ["_row"])
    if cfg.prepare.languages:
        select += ", laionbuild_language(caption) AS language"
    sql = f"SELECT {select} FROM source_rows"
    if cfg.source.ids_url:
        column = q(cfg.source.ids_column)
        sql = (f"SELECT r.*, i._in_ids FROM ({sql}) r LEFT JOIN "
               f"(SELECT DISTINCT id, true AS _in_ids FROM ids) i ON r.{column} = i.id")
    return sql


def _has_url(dialect: SqlDialect) -> str:
    """`url IS NOT NULL AND trim(url) <> ''`. On DuckDB, a URL whose first character is ASCII
    and not a space (among ASCII characters, DuckDB's trim removes the space only) holds without
    trimming: the same result, without a trimmed copy of every URL (a CASE, as DuckDB evaluates
    its branches lazily; an OR evaluates both sides)."""
    if dialect.name == "duckdb":
        return "url IS NOT NULL AND CASE WHEN unicode(url) BETWEEN 33 AND 127 THEN true ELSE trim(url) <> '' END"
    return "url IS NOT NULL AND trim(url) <> ''"


def rules(cfg, columns: set[str], dialect: SqlDialect = DUCKDB) -> list[Rule]:
    """The metadata filters in funnel order. A rule whose column the source lacks is skipped."""
    p = cfg.prepare
    out: list[Rule] = [("has_url", _has_url(dialect))]
    if cfg.source.ids_url:
        out.append(("ids", "_in_ids"))
    if "nsfw" in columns and (p.nsfw.drop or p.nsfw.drop_missing):
        dropped = ", ".join(sql_string(v) for v in p.nsfw.drop) or "NULL"
        # explicit NULL handling: `nsfw NOT IN (...)` alone would silently drop missing tags
        missing = "false" if p.nsfw.drop_missing else "true"
        out.append(("nsfw", f"CASE WHEN nsfw IS NULL THEN {missing} ELSE nsfw NOT IN ({dropped}) END"))
    if p.min_similarity is not None:
        out.append(("min_similarity", f"similarity >= {float(p.min_similarity)!r}"))
    words = dialect.words("caption")
    for key, expr, op in (("min_caption_chars", "length(coalesce(caption, ''))", ">="),
                          ("max_caption_chars", "length(coalesce(caption, ''))", "<="),
                          ("min_caption_words", words, ">="), ("max_caption_words", words, "<=")):
        if getattr(p, key) is not None:
            out.append((key, f"{expr} {op} {int(getattr(p, key))}"))
    if p.languages:
        out.append(("language", f"language IN ({', '.join(sql_string(x) for x in p.languages)})"))
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
        engine(cfg, part, path, arrow, ids, pairs, counts, out / "metadata.parquet")
        counts.save(out)
    log.info("prepared part %d (%s engine): %s", part, cfg.engine.name, dict(counts.values))


def part_ids(cfg, part: int, pairs: list[tuple[str, str]], schema: pa.Schema) -> pa.Table | None:
    """The id list's entries for `part` (source.ids_url), typed like the source's id column."""
    if not cfg.source.ids_url:
        return None
    from ..ids import ids_table  # imported only when used: the stage's start-up is part of its time

    id_source = next(src for src, dst in pairs if dst == cfg.source.ids_column)
    return ids_table(cfg.source.ids_url, part, cfg.source.ids_column, schema.field(id_source).type)


def duckdb_source(cfg, path: Path, arrow: pa.Table | None, ids: pa.Table | None,
                  limit: int | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection holding what `rows_sql` reads: the part's rows as `source_rows` (a
    parquet file scanned in place, with its row number as `_row`; the first `limit` rows only
    if given), the id list as `ids`, and the language detector as `laionbuild_language`."""
    con = duckdb.connect()
    if arrow is None:
        cut = "" if limit is None else f" LIMIT {int(limit)}"
        con.execute("CREATE TEMP VIEW source_rows AS SELECT *, file_row_number AS _row FROM "
                    f"read_parquet({sql_string(path)}, file_row_number=true){cut}")
    else:
        con.register("source_rows", arrow if limit is None else arrow.slice(0, limit))
    if ids is not None:
        con.register("ids", ids)
    if cfg.prepare.languages:
        from ..language import detect

        score = cfg.prepare.min_language_score
        con.create_function("laionbuild_language", lambda c: pa.array(detect(c.to_pylist(), score), pa.string()),
                            ["VARCHAR"], "VARCHAR", type="arrow", null_handling="special", side_effects=False)
    return con


def _output_columns(cfg, pairs, dialect: SqlDialect) -> str:
    return ", ".join(["key"] + [dialect.quote(dst) for _, dst in pairs] + (["language"] if cfg.prepare.languages else []))


def _run_duckdb(cfg, part, path, arrow, ids, pairs, counts, target: Path) -> None:
    con = duckdb_source(cfg, path, arrow, ids)
    # a table, not a view, when a UDF is involved: the language is detected once, not per scan
    kind = "TABLE" if cfg.prepare.languages else "VIEW"
    con.execute(f"CREATE TEMP {kind} rows AS {rows_sql(cfg, part, pairs, DUCKDB)}")
    active = rules(cfg, set(cfg.source.columns), DUCKDB)
    try:
        count(lambda sql: con.execute(sql).fetchone(), "rows", active, counts, rows_name="rows_in")
        # DuckDB keeps source order through scans, projections and filters (its documented
        # order preservation), so only the id-list join needs a sort, which holds the part in memory
        order = " ORDER BY _row" if ids is not None else ""
        con.execute(f"SET threads = {int(cfg.engine.write_threads)}")
        con.execute(f"""COPY (SELECT {_output_columns(cfg, pairs, DUCKDB)} FROM rows WHERE {where(active)}{order})
                        TO {sql_string(target)} (FORMAT parquet)""")
    except duckdb.Error as exc:
        raise InputError(f"{path}: {str(exc).splitlines()[0]}") from None


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
        from ..spark_udfs import language_udf

        spark.udf.register("laionbuild_language", language_udf(cfg.prepare.min_language_score))
    spark.sql(rows_sql(cfg, part, pairs, SPARK)).cache().createOrReplaceTempView("rows")
    active = rules(cfg, set(cfg.source.columns), SPARK)
    count(lambda sql: tuple(spark.sql(sql).collect()[0]), "rows", active, counts, rows_name="rows_in")
    result = spark.sql(f"SELECT {_output_columns(cfg, pairs, SPARK)} FROM rows WHERE {where(active)} ORDER BY _row")
    pq.write_table(spark_to_arrow(result), target)

