"""select: one vectorised query over all parts' tag tables keeps the samples that pass every rule
of `select` (`data/selected/selected.parquet`: part, key, in build order). It never recomputes a
tag, so sweeping a threshold costs a scan of the tag columns."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_dir
from ..funnel import Counts
from ..layout import NEARDUP, SELECTED, part_dir
from ..rules import count, where


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


def load_tags(parts) -> pa.Table:
    tables = [pq.read_table(part_dir("tag", p) / "tags.parquet") for p in parts]
    table = pa.concat_tables(tables, promote_options="default")
    return table.append_column("_row", pa.array(np.arange(table.num_rows)))  # build order


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def run(cfg) -> None:
    tags = load_tags(cfg.subset.parts)
    con = duckdb.connect()
    near = pq.read_table(NEARDUP / "neardup.parquet")
    if cfg.select.max_near_dup_similarity is not None:  # the table has one row per embedded sample
        con.register("near", near)
        con.register("tag_rows", tags)
        con.execute("CREATE TEMP TABLE tags AS SELECT t.*, n.near_dup_similarity, n.near_dup_of FROM tag_rows t "
                    "LEFT JOIN near n ON t.key = n.key")
    else:
        con.register("tags", tags)
    for name in [*cfg.select.min_scores, *cfg.select.max_scores]:
        if name not in tags.column_names:
            raise ValueError(f"select: no `{name}` tag column (its score head was skipped: missing weights? "
                             f"see data/tags/part_N/stats.json)")
    active = rules(cfg.select)
    counts = Counts()
    count(lambda sql: con.execute(sql).fetchone(), "tags", active, counts, rows_name="tagged")
    selected = con.execute(f"SELECT part, key FROM tags WHERE {where(active)} ORDER BY _row").arrow()
    if hasattr(selected, "read_all"):
        selected = selected.read_all()
    counts.set("selected", selected.num_rows)
    with atomic_dir(SELECTED) as out:
        pq.write_table(selected, out / "selected.parquet")
        counts.save(out, rules=[name for name, _ in active])
