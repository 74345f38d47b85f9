"""select: one vectorised query over all parts' tag tables keeps the samples that pass every rule
of `select` (`data/selected/selected.parquet`: part, key, in build order). It never recomputes a
tag, so sweeping a threshold costs a scan of the tag columns."""

from __future__ import annotations

import duckdb
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..atomic import atomic_dir
from ..funnel import Counts
from ..layout import NEARDUP, SELECTED, part_dir
from ..recipe.errors import InputError
from ..rules import count, sql_string, where


def rules(select_cfg) -> list[tuple[str, str]]:
    """(name, SQL predicate over tag columns) for every active rule, in funnel order."""
    out = []
    if select_cfg.min_clip_similarity is not None:
        out.append(("min_clip_similarity", f"clip_similarity >= {float(select_cfg.min_clip_similarity)!r}"))
    if select_cfg.min_faces is not None:
        out.append(("min_faces", f"face_count >= {int(select_cfg.min_faces)}"))
    if select_cfg.min_face_score is not None:
        out.append(("min_face_score", f"face_max_score >= {float(select_cfg.min_face_score)!r}"))
    for name, value in sorted(select_cfg.min_scores.items()):
        out.append((f"min_{name}", f"{quote(name)} >= {float(value)!r}"))
    for name, value in sorted(select_cfg.max_scores.items()):
        out.append((f"max_{name}", f"{quote(name)} <= {float(value)!r}"))
    if select_cfg.max_near_dup_similarity is not None:
        out.append(("max_near_dup_similarity", f"near_dup_similarity < {float(select_cfg.max_near_dup_similarity)!r}"))
    return out


def _tag_columns(parts) -> list[str]:
    names: dict[str, None] = {}
    for p in parts:
        names.update(dict.fromkeys(pq.read_schema(part_dir("tag", p) / "tags.parquet").names))
    return list(names)


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def run(cfg) -> None:
    active = rules(cfg.select)
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
    if cfg.select.max_near_dup_similarity is not None:  # a join: keep build order explicitly
        con.execute(f"""CREATE TEMP VIEW tags AS SELECT t.*, n.near_dup_similarity FROM
                        (SELECT {columns}, row_number() OVER () AS _row FROM {source}) t
                        LEFT JOIN read_parquet({sql_string(NEARDUP / 'neardup.parquet')}) n ON t.key = n.key""")
        order = " ORDER BY _row"
    else:
        con.execute(f"CREATE TEMP VIEW tags AS SELECT {columns} FROM {source}")
    counts = Counts()
    # rows in: the files' footers; after the last rule: the rows written. Only the rules before
    # the last need a counting scan (of their columns only).
    counts.set("tagged", sum(pq.read_metadata(f).num_rows for f in files))
    if len(active) > 1:
        count(lambda sql: con.execute(sql).fetchone(), "tags", active[:-1], counts)
    with atomic_dir(SELECTED) as out:
        # uncompressed: ~18 bytes per selected row (snappy: ~5) for ~20% less CPU per sweep point
        con.execute(f"COPY (SELECT part, key FROM tags WHERE {where(active)}{order}) "
                    f"TO {sql_string(out / 'selected.parquet')} (FORMAT parquet, COMPRESSION 'uncompressed')")
        selected = pq.read_metadata(out / "selected.parquet").num_rows
        if active:
            counts.set(f"after_{active[-1][0]}", selected)
        counts.set("selected", selected)
        counts.save(out, rules=[name for name, _ in active])


def selected_keys(selected: pq.ParquetFile, part: int) -> list[str]:
    """The selected keys of one part, in build order, reading only the row groups of
    `selected.parquet` that can hold the part (the file is in part order): memory follows one
    part, not the build."""
    keys: list[str] = []
    part_index = selected.schema_arrow.get_field_index("part")
    for i in range(selected.num_row_groups):
        stats = selected.metadata.row_group(i).column(part_index).statistics
        if stats is not None and stats.has_min_max and not stats.min <= part <= stats.max:
            continue
        group = selected.read_row_group(i, columns=["key", "part"])
        keys += group.filter(pc.equal(group.column("part"), part)).column("key").to_pylist()
    return keys
