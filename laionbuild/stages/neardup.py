"""neardup (global): for every embedded sample, its highest cosine similarity to an *earlier*
sample of the build (build order: part order, then key) and that sample's key, from the image
embeddings, with faiss -> `data/neardup/neardup.parquet` (key, near_dup_similarity,
near_dup_of). Computed once; semantic dedup is then the select rule
`select.max_near_dup_similarity` (keep samples below it), so sweeping its threshold costs a
query, not a search.

`tag.near_dup.enabled: false` (the default) writes the keys only. `tag.near_dup.index`:
a faiss index_factory string; `Flat` is exact (quadratic: fine up to a few million samples),
`HNSW32` and the like are approximate and scale. The first sample has similarity -1 (nothing
earlier) and no `near_dup_of`."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild.project.atomic import atomic_dir
from laionbuild.project.funnel import Counts
from laionbuild.project.layout import NEARDUP
from laionbuild.project.outputs import image_embeddings

log = logging.getLogger(__name__)
BATCH = 4096


def run(cfg) -> None:
    settings = cfg.tag.near_dup
    keys: list[str] = []
    similarity: list[np.ndarray] = []
    neighbour: list[np.ndarray] = []
    if settings.enabled:
        import faiss

        index = None
        for part in cfg.subset.parts:
            part_keys, emb = image_embeddings(part, settings.model)
            if index is None and len(emb):
                index = faiss.index_factory(emb.shape[1], settings.index, faiss.METRIC_INNER_PRODUCT)
                if not index.is_trained:
                    index.train(emb)
            for start in range(0, len(emb), BATCH):
                batch = np.ascontiguousarray(emb[start:start + BATCH])
                best = np.full(len(batch), -1.0, np.float32)
                best_at = np.full(len(batch), -1, np.int64)
                if index.ntotal:
                    found, at = index.search(batch, 1)
                    best, best_at = found[:, 0].astype(np.float32), at[:, 0]
                # earlier samples of the same batch: the strict lower triangle
                within = batch @ batch.T
                within[np.triu_indices(len(batch))] = -np.inf
                if len(batch) > 1:
                    j = within.argmax(axis=1)
                    s = within[np.arange(len(batch)), j]
                    better = s > best
                    best = np.where(better, s, best).astype(np.float32)
                    best_at = np.where(better, index.ntotal + j, best_at)
                similarity.append(best)
                neighbour.append(best_at)
                index.add(batch)
            keys += part_keys
        log.info("near duplicates over %d samples (%s)", len(keys), settings.index)
    sims = np.concatenate(similarity) if similarity else np.zeros(0, np.float32)
    at = np.concatenate(neighbour) if neighbour else np.zeros(0, np.int64)
    table = pa.table({
        "key": pa.array(keys, pa.string()),
        "near_dup_similarity": pa.array(np.clip(sims, -1.0, 1.0), pa.float32()),
        "near_dup_of": pa.array([keys[i] if i >= 0 else None for i in at], pa.string()),
    })
    counts = Counts()
    with atomic_dir(NEARDUP) as out:
        pq.write_table(table, out / "neardup.parquet")
        counts.save(out, enabled=bool(settings.enabled), index=settings.index)
