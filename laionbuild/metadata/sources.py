"""Source metadata parts as the stages read them: the file format, the canonical columns (`key`,
`url`, `caption` and whichever of sample_id/width/height/license/nsfw/similarity the source maps),
the part's rows as SQL for either engine, its id-list entries, the files of a `source.files`
glob, and where each part (and each of consolidate's inputs) comes from. prepare, consolidate
and the report's examples read parts through here.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild.engine.sql import SqlDialect
from laionbuild.metadata.rules import sql_string
from laionbuild.project.layout import CONSOLIDATED
from laionbuild.recipe.errors import InputError, MissingInputError


def source_listing(cfg) -> dict[str, dict]:
    """{url: what the listing says about it (size, and ETag etc. where the store lists them)}
    for every file of the source matching `source.files` (a glob inside base_url), sorted: one
    listing of the folder (per folder level of the glob), whatever the number of parts."""
    fs, base = fsspec.core.url_to_fs(cfg.source.base_url)
    found = fs.glob(f"{base.rstrip('/')}/{cfg.source.files}", detail=True)
    if not found:
        raise MissingInputError(f"no file matches source.files `{cfg.source.files}` in {cfg.source.base_url}")
    local = fs.protocol in ("file", ("file", "local"))
    return {(m if local else fs.unstrip_protocol(m)): found[m] for m in sorted(found)}


def source_files(cfg) -> list[str]:
    """Every file of the source matching `source.files`, sorted."""
    return list(source_listing(cfg))


def source_url(cfg, part: int, files: list[str] | None = None) -> str:
    """Where part N of the build comes from: a consolidated part, the N-th file of
    `source.files` (`files`: that list, when the caller listed it once for many parts), or
    base_url + part_pattern."""
    if cfg.source.consolidate_parts:
        return str(CONSOLIDATED / f"part-{part:05d}.parquet")
    if cfg.source.files:
        files = source_files(cfg) if files is None else files
        if part >= len(files):
            raise MissingInputError(f"source.files `{cfg.source.files}` matches {len(files)} files in "
                                    f"{cfg.source.base_url}; part {part} has none")
        return files[part]
    base = cfg.source.base_url.rstrip("/")
    return f"{base}/{cfg.source.part_pattern.format(part=part)}"


def image_embeddings_url(cfg, part: int, files: list[str] | None = None) -> str | None:
    """Where part N's precomputed image embeddings are (source.image_embeddings), or None.
    `{stem}` in it is the part file's path inside base_url without its extension (`files`: the
    source.files listing, when the caller listed it once for many parts)."""
    if not cfg.source.image_embeddings:
        return None
    base = cfg.source.base_url.rstrip("/")
    stem = ""
    if "{stem" in cfg.source.image_embeddings:
        part_url = source_url(cfg, part, files)
        root = fsspec.core.url_to_fs(base)[1].rstrip("/") + "/"
        path = fsspec.core.url_to_fs(part_url)[1]
        inside = path[len(root):] if path.startswith(root) else path.rsplit("/", 1)[-1]
        stem = inside.removesuffix(PurePosixPath(inside).suffix)
    return f"{base}/{cfg.source.image_embeddings.format(part=part, stem=stem)}"


def input_urls(cfg) -> list[str]:
    """Every source file, in part order: what consolidate reads."""
    if cfg.source.files:
        return source_files(cfg)
    base = cfg.source.base_url.rstrip("/")
    return [f"{base}/{cfg.source.part_pattern.format(part=p)}" for p in range(cfg.source.num_parts)]


# canonical column -> predicate on its Arrow type, and what to call that type in an error
COLUMN_TYPES = {
    "url": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "strings"),
    "caption": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t), "strings"),
    "nsfw": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t), "strings"),
    "license": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t), "strings"),
    "language": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t), "strings"),
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
    if cfg.prepare.caption_word_list:
        select += ", laionbuild_caption_words(caption) AS _caption_words"
    sql = f"SELECT {select} FROM source_rows"
    if cfg.source.ids_url:
        column = q(cfg.source.ids_column)
        sql = (f"SELECT r.*, i._in_ids FROM ({sql}) r LEFT JOIN "
               f"(SELECT DISTINCT id, true AS _in_ids FROM ids) i ON r.{column} = i.id")
    return sql


def part_ids(cfg, part: int, pairs: list[tuple[str, str]], schema: pa.Schema) -> pa.Table | None:
    """The id list's entries for `part` (source.ids_url), typed like the source's id column."""
    if not cfg.source.ids_url:
        return None
    from laionbuild.metadata.ids import ids_table  # imported only when used: the stage's start-up is part of its time

    id_source = next(src for src, dst in pairs if dst == cfg.source.ids_column)
    return ids_table(cfg.source.ids_url, part, cfg.source.ids_column, schema.field(id_source).type)


def duckdb_source(cfg, path: Path, arrow: pa.Table | None, ids: pa.Table | None,
                  limit: int | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection holding what `rows_sql` reads: the part's rows as `source_rows` (a
    parquet file scanned in place, with its row number as `_row`; the first `limit` rows only
    if given), the id list as `ids`, the language detector as `laionbuild_language` and the
    word list's matcher as `laionbuild_caption_words`."""
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
        from laionbuild.metadata.language import detect

        score, detector, model = language_settings(cfg)
        con.create_function("laionbuild_language",
                            lambda c: pa.array(detect(c.to_pylist(), score, detector, model), pa.string()),
                            ["VARCHAR"], "VARCHAR", type="arrow", null_handling="special", side_effects=False)
    if cfg.prepare.caption_word_list:
        from laionbuild.metadata.words import load_word_list, matcher

        contains = matcher(load_word_list(cfg.prepare.caption_word_list))
        con.create_function("laionbuild_caption_words", lambda c: pa.array(contains(c.to_pylist()), pa.bool_()),
                            ["VARCHAR"], "BOOLEAN", type="arrow", null_handling="special", side_effects=False)
    return con


def language_settings(cfg) -> tuple[float, str, str | None]:
    """(min_score, detector, model path) of prepare's language detection."""
    p = cfg.prepare
    return p.min_language_score, p.language_detector, str(Path(p.language_model).expanduser()) if p.language_model else None
