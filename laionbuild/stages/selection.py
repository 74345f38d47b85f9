"""select: one vectorised query over all parts' tag tables keeps the samples that pass every rule
of `select` (`data/selected/selected.parquet`: part, key, in build order; where the tags carry
a `uid`, also `uids.npy`: the selected uids in DataComp's format, metadata/uids.py). It never
recomputes a tag, so sweeping a threshold costs a scan of the tag columns."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow.parquet as pq

from laionbuild.metadata.blocklists import image_blocked_column
from laionbuild.metadata.rules import count, quote, sql_string, tag_rules, where
from laionbuild.metadata.uids import uid_array
from laionbuild.project.atomic import atomic_dir
from laionbuild.project.funnel import Counts
from laionbuild.project.layout import CLUSTERS, NEARDUP, SELECTED, part_dir
from laionbuild.project.outputs import image_screened, source_column, source_rows
from laionbuild.recipe.errors import InputError


def _tag_columns(parts) -> list[str]:
    names: dict[str, None] = {}
    for p in parts:
        names.update(dict.fromkeys(pq.read_schema(part_dir("tag", p) / "tags.parquet").names))
    return list(names)


def top_fraction_threshold(con, column: str, fraction: float) -> float | None:
    """DataComp's get_threshold over every tagged sample of the build: the value at index
    int(N * fraction) of the column sorted high to low (N counts every sample; nulls and NaN
    rank below every value), or the lowest value where that index falls on a null (every
    sample with a value is then kept; DataComp's would compare with NaN and keep none). None:
    no sample has a value. Memory: one float64 a tagged sample (80 MB per 10M), filled from
    DuckDB's result in batches and selected in place."""
    value = f"CAST({quote(column)} AS DOUBLE)"
    valued = f"SELECT v FROM (SELECT {value} AS v FROM tags) WHERE v IS NOT NULL AND NOT isnan(v)"
    total = con.execute("SELECT count(*) FROM tags").fetchone()[0]  # (no value computed: one scan of the values)
    values, filled = np.empty(total, np.float64), 0  # filled batch by batch: no second copy
    for batch in con.execute(valued).fetch_record_batch(1 << 20):
        chunk = batch.column(0).to_numpy(zero_copy_only=False)
        values[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    return threshold_of(values[:filled], total, fraction)


def source_top_fraction_threshold(cfg, column: str, fraction: float) -> float | None:
    """The same over every row of the fetched source parts (select.top_fraction_of=source):
    DataComp's get_threshold over the whole pool, before prepare's filters and dedup. The valued
    rows go into one array sized from the parquet footers (one float64 a source row, plus a few
    copies of one part's column at a time: 80 MB per 10M rows, 100 GB for DataComp's 12.8B pool); parts
    with no footer (csv, json) are read first and held until copied in (their rows twice)."""
    parts = list(cfg.subset.parts)
    rows = {part: source_rows(cfg, part) for part in parts}
    columns = {part: source_column(cfg, part, column) for part, n in rows.items() if n is None}  # no footer
    rows.update({part: len(values) for part, values in columns.items()})
    values, filled = np.empty(sum(rows.values()), np.float64), 0
    for part in parts:
        column_values = columns.pop(part) if part in columns else source_column(cfg, part, column)
        valued = column_values[~np.isnan(column_values)]
        values[filled:filled + len(valued)] = valued
        filled += len(valued)
        del column_values, valued
    return threshold_of(values[:filled], sum(rows.values()), fraction)


def threshold_of(values: np.ndarray, total: int, fraction: float) -> float | None:
    """The value at index min(int(total * fraction), len(values) - 1) of `values` (the non-null
    ones of `total`) sorted high to low, by a selection (numpy's introselect, linear), not a
    sort, in place: `values` (float64) is negated and partitioned, no copy is made."""
    if not len(values):
        return None
    index = min(int(total * fraction), len(values) - 1)
    np.negative(values, out=values)
    values.partition(index)
    return float(-values[index])


def run(cfg) -> None:
    named = tag_rules(cfg.select)  # the top_fraction rules without their thresholds yet
    files = [part_dir("tag", p) / "tags.parquet" for p in cfg.subset.parts]
    available = _tag_columns(cfg.subset.parts)
    for name in [*cfg.select.min_scores, *cfg.select.max_scores]:
        if name not in available:
            raise InputError(f"select: no `{name}` tag column (its score head or the watermark model was skipped: "
                             f"missing weights? see data/tags/part_N/stats.json, data/watermark/part_N/stats.json)")
    for name in cfg.select.top_fraction:
        if name not in available:
            raise InputError(f"select.top_fraction: no `{name}` tag column in data/tags (it has {available}); "
                             "name one of those")
    # only the columns the rules use (not face boxes and the like), read by DuckDB straight from
    # the parts' files, in build order (a multi-file scan keeps file and row order)
    needed = ["part", "key"] + [c for c in available if c not in ("part", "key")
                                and (c == "uid" or any(c in predicate for _, predicate in named))]
    source = (f"read_parquet([{', '.join(sql_string(f) for f in files)}], union_by_name=true)")
    con = duckdb.connect()
    if cfg.select.image_blocklists:  # + `_image_blocked_<name>`: the keys the screen stage matched
        source = image_screened(con, cfg, source)
        needed += [image_blocked_column(e.name) for e in cfg.select.image_blocklists]
    columns = ", ".join(quote(c) for c in needed)
    # one thread writes the ordered file with the least CPU (what a sweep point costs)
    con.execute(f"SET threads = {int(cfg.engine.write_threads)}")
    order = ""
    by_language = bool(cfg.select.min_clip_similarity_by_language)
    view = "tagged" if by_language else "tags"
    # the global stages' per-sample tags, joined by key (a join: keep build order explicitly)
    joins = []
    if cfg.select.max_near_dup_similarity is not None:
        joins.append(("near_dup_similarity", NEARDUP / "neardup.parquet"))
    if cfg.select.in_target_clusters:
        joins.append(("in_target_cluster", CLUSTERS / "clusters.parquet"))
    if joins:
        picked = "".join(f", j{i}.{quote(column)}" for i, (column, _) in enumerate(joins))
        joined = "".join(f" LEFT JOIN read_parquet({sql_string(path)}) j{i} ON t.key = j{i}.key"
                         for i, (_, path) in enumerate(joins))
        con.execute(f"""CREATE TEMP VIEW {view} AS SELECT t.*{picked} FROM
                        (SELECT {columns}, row_number() OVER () AS _row FROM {source}) t{joined}""")
        order = " ORDER BY _row"
    else:
        con.execute(f"CREATE TEMP VIEW {view} AS SELECT {columns} FROM {source}")
    if by_language:  # the samples' language, joined by key (metadata/language.py): keep build order
        from laionbuild.metadata.language import ORDER_COLUMN, join_language

        join_language(con, cfg, view, "tags")
        order = f" ORDER BY {ORDER_COLUMN}"
    # top_fraction's thresholds over every tagged row of the build
    if cfg.select.top_fraction_of == "source":
        thresholds = {c: source_top_fraction_threshold(cfg, c, f) for c, f in sorted(cfg.select.top_fraction.items())}
    else:
        thresholds = {c: top_fraction_threshold(con, c, f) for c, f in sorted(cfg.select.top_fraction.items())}
    active = tag_rules(cfg.select, thresholds)
    counts = Counts()
    # rows in: the files' footers; after the last rule: the rows written. Only the rules before
    # the last need a counting scan (of their columns only).
    counts.set("tagged", sum(pq.read_metadata(f).num_rows for f in files))
    if len(active) > 1:
        count(lambda sql: con.execute(sql).fetchone(), "tags", active[:-1], counts)
    with atomic_dir(SELECTED) as out:
        # zstd: ~2.2 bytes per selected sample (uncompressed ~18, snappy ~5) for ~0.4 CPU-s more per
        # 10M selected rows: a sweep point's selection is what it adds to DVC's cache (#22: <= 16 B a
        # sample; at 400M that is ~0.9 GB a point instead of 7.2 GB). docs/benchmarks.md
        con.execute(f"COPY (SELECT part, key FROM tags WHERE {where(active)}{order}) "
                    f"TO {sql_string(out / 'selected.parquet')} (FORMAT parquet, COMPRESSION 'zstd')")
        selected = pq.read_metadata(out / "selected.parquet").num_rows
        if "uid" in available:  # DataComp's subset file: the selected uids, sorted
            uids = con.execute(f"SELECT uid FROM tags WHERE {where(active)}").fetch_arrow_table().column("uid")
            np.save(out / "uids.npy", uid_array(uids, "data/tags/part_N/tags.parquet column `uid`"))
        if active:
            counts.set(f"after_{active[-1][0]}", selected)
        counts.set("selected", selected)
        counts.save(out, rules=[name for name, _ in active], top_fraction_thresholds=thresholds)


