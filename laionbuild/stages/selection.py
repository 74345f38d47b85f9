"""select: one vectorised query over all parts' tag tables keeps the samples that pass every rule
of `select` (`data/selected/selected.parquet`: part, key, in build order). It never recomputes a
tag, so sweeping a threshold costs a scan of the tag columns."""

from __future__ import annotations

import duckdb
import pyarrow.parquet as pq

from laionbuild.metadata.rules import count, quote, sql_string, tag_rules, where
from laionbuild.project.atomic import atomic_dir
from laionbuild.project.funnel import Counts
from laionbuild.project.layout import NEARDUP, SELECTED, part_dir
from laionbuild.recipe.errors import InputError


def _tag_columns(parts) -> list[str]:
    names: dict[str, None] = {}
    for p in parts:
        names.update(dict.fromkeys(pq.read_schema(part_dir("tag", p) / "tags.parquet").names))
    return list(names)


def run(cfg) -> None:
    active = tag_rules(cfg.select)
    files = [part_dir("tag", p) / "tags.parquet" for p in cfg.subset.parts]
    available = _tag_columns(cfg.subset.parts)
    for name in [*cfg.select.min_scores, *cfg.select.max_scores]:
        if name not in available:
            raise InputError(f"select: no `{name}` tag column (its score head was skipped: missing weights? "
                             f"see data/tags/part_N/stats.json)")
    # only the columns the rules use (not face boxes and the like), read by DuckDB straight from
    # the parts' files, in build order (a multi-file scan keeps file and row order)
    needed = ["part", "key"] + [c for c in available if c not in ("part", "key")
                                and any(c in predicate for _, predicate in active)]
    source = (f"read_parquet([{', '.join(sql_string(f) for f in files)}], union_by_name=true)")
    columns = ", ".join(quote(c) for c in needed)
    con = duckdb.connect()
    # one thread writes the ordered file with the least CPU (what a sweep point costs)
    con.execute(f"SET threads = {int(cfg.engine.write_threads)}")
    order = ""
    keywords = cfg.select.unsafe_keywords is not None
    by_language = bool(cfg.select.min_clip_similarity_by_language)
    view = "tagged" if keywords or by_language else "tags"
    if cfg.select.max_near_dup_similarity is not None:  # a join: keep build order explicitly
        con.execute(f"""CREATE TEMP VIEW {view} AS SELECT t.*, n.near_dup_similarity FROM
                        (SELECT {columns}, row_number() OVER () AS _row FROM {source}) t
                        LEFT JOIN read_parquet({sql_string(NEARDUP / 'neardup.parquet')}) n ON t.key = n.key""")
        order = " ORDER BY _row"
    else:
        con.execute(f"CREATE TEMP VIEW {view} AS SELECT {columns} FROM {source}")
    if by_language:  # the samples' language, joined by key (metadata/language.py): keep build order
        from laionbuild.metadata.language import ORDER_COLUMN, join_language

        join_language(con, cfg, view, "tagged_language" if keywords else "tags")
        view = "tagged_language"
        order = f" ORDER BY {ORDER_COLUMN}"
    if keywords:  # the captions' keyword matches, joined by key (metadata/keywords.py): keep build order
        from laionbuild.metadata.keywords import apply

        apply(con, cfg, view, "tags", available)
        order = " ORDER BY _kw_row"
    counts = Counts()
    # rows in: the files' footers; after the last rule: the rows written. Only the rules before
    # the last need a counting scan (of their columns only).
    counts.set("tagged", sum(pq.read_metadata(f).num_rows for f in files))
    if len(active) > 1:
        count(lambda sql: con.execute(sql).fetchone(), "tags", active[:-1], counts)
    with atomic_dir(SELECTED) as out:
        # uncompressed: a few times the bytes of snappy for less CPU per sweep point (docs/benchmarks.md)
        con.execute(f"COPY (SELECT part, key FROM tags WHERE {where(active)}{order}) "
                    f"TO {sql_string(out / 'selected.parquet')} (FORMAT parquet, COMPRESSION 'uncompressed')")
        selected = pq.read_metadata(out / "selected.parquet").num_rows
        if active:
            counts.set(f"after_{active[-1][0]}", selected)
        counts.set("selected", selected)
        counts.save(out, rules=[name for name, _ in active])


