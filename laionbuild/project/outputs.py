"""What stages read of one another's outputs, in one place, so no stage imports another: the
selected keys of a part (select's output, read by assemble, export, card), the selected samples
per licence (card and report), the funnel's steps in order (report, `build --progress`), the
keys the screen stage matched (select and report), a part's keys with its image embeddings
(embed's output, read by neardup and clusters), and one column of a fetched source part (select's
top_fraction over the whole source).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionbuild.metadata.rules import metadata_rules, sql_string, tag_rules
from laionbuild.project.layout import EMBEDDINGS, KEY_COLUMN, SELECTED, embed_dir, part_dir

# data/dataset/ and data/embeddings/ of a point built with assemble.materialize=false hold only
# this file, the same for every point (so the stages after assemble see no change between points)
UNMATERIALIZED_FILE = "UNMATERIALIZED.json"
UNMATERIALIZED = {
    "materialized": False,
    "why": "assemble.materialize is false (a sweep point): the selection is data/selected/selected.parquet",
    "read": "laionbuild.read('.') yields the selected samples from the download shards",
    "materialize": "`laionbuild materialize` writes data/dataset, data/embeddings, data/export and data/index",
}


def materialized(root: Path = Path(".")) -> bool:
    """Whether data/embeddings holds the selection's embeddings (false: assemble.materialize=false)."""
    return not (root / EMBEDDINGS / UNMATERIALIZED_FILE).exists()


SCREENED_FILE = "blocked.parquet"  # data/screened/part_N/: (key, list) of the samples an image list names


def screened_keys(part: int) -> set[str]:
    """The keys of part `part` the screen stage matched against select.image_blocklists (empty
    when no list is set or the part has no screened output)."""
    path = part_dir("screen", part) / SCREENED_FILE
    if not path.exists():
        return set()
    return {str(k) for k in pq.read_table(path, columns=["key"]).column("key").to_pylist()}


def screened_files(cfg) -> list[str]:
    return [str(part_dir("screen", p) / SCREENED_FILE) for p in cfg.subset.parts]


def image_screened(con, cfg, relation: str) -> str:
    """A relation of `relation`'s rows (keyed by `key`, in their order) plus one boolean
    `_image_blocked_<name>` column per list of select.image_blocklists, from the screen stage's
    matched keys. A join of the build's few matched keys, not of the lists."""
    from laionbuild.metadata.blocklists import image_blocked_column

    files = ", ".join(sql_string(f) for f in screened_files(cfg))
    con.execute(f"CREATE TEMP TABLE _screened AS SELECT key, list FROM read_parquet([{files}])")
    names = [image_blocked_column(e.name) for e in cfg.select.image_blocklists]
    flags = ", ".join(f"bool_or(list = {sql_string(e.name)}) AS {n}" for e, n in zip(cfg.select.image_blocklists, names))
    # a join: the rows' order is kept by their number (the build order every reader expects)
    return (f"(SELECT t.* EXCLUDE (_screen_row), {', '.join(f'coalesce(b.{n}, false) AS {n}' for n in names)} "
            f"FROM (SELECT *, row_number() OVER () AS _screen_row FROM {relation}) t "
            f"LEFT JOIN (SELECT key, {flags} FROM _screened GROUP BY key) b ON t.key = b.key ORDER BY t._screen_row)")


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


def licences(cfg) -> dict:
    """Selected samples per licence (the source's `license` column; "unknown" when missing)."""
    counts: Counter = Counter()
    selected = pq.ParquetFile(SELECTED / "selected.parquet")
    for part in cfg.subset.parts:
        keys = set(selected_keys(selected, part))
        if not keys:
            continue
        path = part_dir("dedup", part) / "metadata.parquet"
        if "license" not in pq.read_schema(path).names:
            counts["unknown"] += len(keys)
            continue
        table = pq.read_table(path, columns=["key", "license"]).to_pydict()
        counts.update((lic or "unknown") for key, lic in zip(table["key"], table["license"]) if key in keys)
    return dict(counts.most_common())


def step_order(cfg) -> list[str]:
    """The funnel's steps in pipeline order: rows in, each metadata filter, dedup, downloaded,
    embedded, each select rule, selected, indexed."""
    return (["rows_in"] + [f"after_{name}" for name, _ in metadata_rules(cfg, set(cfg.source.columns))]
            + ["after_dedup", "downloaded_ok", "embedded"] + [f"after_{name}" for name, _ in tag_rules(cfg.select)]
            + ["selected", "indexed"])


def image_embeddings(part: int, model: str | None = None, normalise: bool = True) -> tuple[list[str], np.ndarray]:
    """A part's keys and its image embeddings by `model` (None: embed.model) as float32, in the
    part's row order; `normalise`: each row scaled to unit length (a zero row stays zero). A
    file whose row count is not the part's metadata's is refused, naming the stage to rebuild."""
    keys = pq.read_table(part_dir("embed", part) / "metadata" / "metadata_0.parquet",
                         columns=[KEY_COLUMN]).column(KEY_COLUMN)
    path = embed_dir(part, model) / "img_emb" / "img_emb_0.npy"
    emb = np.load(path).astype(np.float32)
    if len(emb) != len(keys):
        raise RuntimeError(f"{path}: {len(emb)} rows, the part has {len(keys)}; rebuild embed@{part}")
    if normalise:
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = emb / np.where(norms == 0, 1, norms)
    return [str(k) for k in keys.to_pylist()], emb


def _source_path(part: int) -> Path:
    """The file of fetched source part `part` (data/raw/part_N)."""
    from laionbuild.project.atomic import read_json

    raw = part_dir("fetch", part)
    return raw / read_json(raw / "fetch.json")["file"]


def source_rows(cfg, part: int) -> int | None:
    """The row count of fetched source part `part` from its parquet footer; None for formats
    that have no footer (the whole file would have to be read)."""
    from laionbuild.metadata.sources import effective_source, file_format

    path = _source_path(part)
    if file_format(path, effective_source(cfg)[2]) != "parquet":
        return None
    return pq.read_metadata(path).num_rows


def source_column(cfg, part: int, column: str) -> np.ndarray:
    """Every row's value of `column` (its canonical name: source.columns / column_aliases map it)
    in fetched source part `part` (data/raw), as float64 with NaN for nulls: the pool as
    published, before any filter. Reads that one column of a parquet part."""
    from laionbuild.metadata.sources import canonical_columns, effective_source, source_schema
    from laionbuild.recipe.errors import InputError

    path = _source_path(part)
    columns, aliases, fmt = effective_source(cfg)
    schema, _, arrow = source_schema(path, fmt)
    src = next((s for s, d in canonical_columns(schema, columns, path, aliases) if d == column), None)
    if src is None:
        raise InputError(f"select.top_fraction_of=source: {path} has no `{column}` column (it has {schema.names}): "
                         "take the fraction of the tagged samples (top_fraction_of=tagged), or name a source column")
    table = arrow.select([src]) if arrow is not None else pq.read_table(path, columns=[src])
    return pc.cast(table.column(0), "float64").to_numpy(zero_copy_only=False)  # nulls: NaN
