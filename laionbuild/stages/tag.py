"""tag: per-sample tag table of one part (`data/tags/part_N/tags.parquet`): `clip_similarity`
(cosine of the image and text embeddings), the image's original width/height and, with
`tag.faces.detector`, the face tags of the faces stage (face_count, face_max_score,
face_boxes), with `tag.watermark.weights`, the watermark stage's `watermark_score` and, with
`tag.unsafe_keywords`, `unsafe_keyword` (the caption holds a listed keyword).
Tags are computed once per part; selection only queries them."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild.project.atomic import atomic_dir
from laionbuild.project.funnel import Counts
from laionbuild.project.layout import KEY_COLUMN, embed_dir, part_dir
from laionbuild.project.outputs import image_embeddings
from laionbuild.recipe.errors import InputError

log = logging.getLogger(__name__)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0:
        return np.zeros(0, np.float32)
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.einsum("ij,ij->i", a, b)


def _with_source_columns(cfg, part: int, tags: pa.Table) -> pa.Table:
    """tag.source_columns from the part's deduplicated metadata, aligned with the tags by key
    (a `uid` listed there makes select write data/selected/uids.npy), and with
    tag.unsafe_keywords the `unsafe_keyword` tag of the captions: the file read once."""
    path = part_dir("dedup", part) / "metadata.parquet"
    names = pq.read_schema(path).names
    missing = [c for c in cfg.tag.source_columns if c not in names]
    if missing:
        raise InputError(f"{path}: no column {', '.join(f'`{c}`' for c in missing)} (tag.source_columns); "
                         f"the part's metadata has {names}")
    carried = list(cfg.tag.source_columns)
    read = carried + (["caption"] if cfg.tag.unsafe_keywords and "caption" not in carried else [])
    if not read:
        return tags
    source = pq.read_table(path, columns=["key", *read])
    row_of = {k: i for i, k in enumerate(source.column("key").to_pylist())}
    keys = tags.column("key").to_pylist()
    lost = [k for k in keys if k not in row_of]
    if lost:
        raise RuntimeError(f"{path}: no row for {len(lost)} embedded samples (e.g. {lost[0]}); rebuild dedup")
    rows = source.take(pa.array([row_of[k] for k in keys], pa.int64()))
    for name in carried:
        tags = tags.append_column(name, rows.column(name))
    if cfg.tag.unsafe_keywords:  # whether the caption holds a listed keyword (metadata/keywords.py)
        from laionbuild.metadata.keywords import KEYWORD_COLUMN, matches

        tags = tags.append_column(KEYWORD_COLUMN, matches(cfg.tag.unsafe_keywords, rows.column("caption")))
    return tags


def _joined(tags: pa.Table, part: int, stage: str, name: str, what: str) -> pa.Table:
    """`tags` with the tag columns of a pixel stage's table (faces, watermark) of the part, by key;
    a table of keys only (its tag off) adds nothing."""
    table = pq.read_table(part_dir(stage, part) / name)
    columns = [c for c in table.column_names if c != "key"]
    if not columns:
        return tags
    by_key = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    keys = tags.column("key").to_pylist()
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise RuntimeError(f"{part_dir(stage, part)}: no {what} for {len(missing)} embedded samples "
                           f"(e.g. {missing[0]}); rebuild {stage}@{part}")
    rows = pa.array([by_key[k] for k in keys], pa.int64())
    for column in columns:
        tags = tags.append_column(column, table.column(column).take(rows))
    return tags


def run(cfg, part: int) -> None:
    metadata = pd.read_parquet(part_dir("embed", part) / "metadata" / "metadata_0.parquet")
    sim_dir = embed_dir(part, cfg.tag.clip_similarity_model)
    if (sim_dir / "text_emb").exists():
        similarity = pa.array(cosine(image_embeddings(part, cfg.tag.clip_similarity_model, normalise=False)[1],
                                     np.load(sim_dir / "text_emb" / "text_emb_0.npy")), pa.float32())
    else:  # embeddings from the source (embed.from_source): no text embeddings, no CLIP similarity
        similarity = pa.nulls(len(metadata), pa.float32())
    tags = pa.table({
        "key": pa.array(metadata[KEY_COLUMN].astype(str).tolist(), pa.string()),
        "part": pa.array(np.full(len(metadata), part, np.int32)),
        "clip_similarity": similarity,
        "width": pa.array(metadata.get("original_width", pd.Series(dtype="float")).tolist(), pa.int64()),
        "height": pa.array(metadata.get("original_height", pd.Series(dtype="float")).tolist(), pa.int64()),
    })
    tags = _with_source_columns(cfg, part, tags)
    tags = _joined(tags, part, "faces", "faces.parquet", "face tags")
    tags = _joined(tags, part, "watermark", "watermark.parquet", "watermark scores")
    skipped = []
    if cfg.tag.heads:
        from laionbuild.models.heads import load_heads

        specs = {name: {k: v for k, v in vars(head).items() if v is not None and k != "model"}
                 for name, head in cfg.tag.heads.items()}
        heads, skipped = load_heads(specs)
        for warning in skipped:
            log.warning(warning)
        for head in heads:  # each head scores the embeddings of the model it names
            _, emb = image_embeddings(part, cfg.tag.heads[head.name].model, normalise=False)
            tags = tags.append_column(head.name, pa.array(head.score(emb), pa.float32()))
    counts = Counts()
    counts.set("tagged", tags.num_rows)
    with atomic_dir(part_dir("tag", part)) as out:
        pq.write_table(tags, out / "tags.parquet")
        counts.save(out, skipped_heads=skipped)
