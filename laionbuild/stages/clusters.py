"""clusters (global): DataComp's image-based rule (tag.clusters; laionbuild/models/clusters.py).
Centroids are `tag.clusters.centroids` (a file) or k-means over a seeded sample of the build's
image embeddings (`sample_fraction` of each part, drawn with a generator seeded by (seed, part),
so a part's draw does not depend on the other parts); the target clusters are the nearest
centroids of the `targets` embeddings; every embedded sample gets its nearest centroid ->
`data/clusters/clusters.parquet` (key, cluster, in_target_cluster), `centroids.npy` and
`target_clusters.npy`. Selecting by it is the select rule `select.in_target_clusters`, a join
by key: a sweep over other rules never re-clusters.

`tag.clusters.enabled: false` (the default) writes an empty table."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild.models.clusters import load_embeddings, local, nearest, train
from laionbuild.project.atomic import atomic_dir
from laionbuild.project.funnel import Counts
from laionbuild.project.layout import CLUSTERS
from laionbuild.project.outputs import image_embeddings
from laionbuild.recipe.errors import InputError

log = logging.getLogger(__name__)
SCHEMA = pa.schema([("key", pa.string()), ("cluster", pa.int32()), ("in_target_cluster", pa.bool_())])


def _centroids(cfg) -> tuple[np.ndarray, int]:
    s = cfg.tag.clusters
    if s.centroids is not None:
        return load_embeddings(local(s.centroids, "tag.clusters.centroids"), "tag.clusters.centroids"), 0
    sample = []
    for part in cfg.subset.parts:
        _, emb = image_embeddings(part, s.model, normalise=False)
        if s.sample_fraction < 1:
            emb = emb[np.random.default_rng([s.seed, part]).random(len(emb)) < s.sample_fraction]
        sample.append(emb)
    sample = np.concatenate(sample) if sample else np.zeros((0, 0), np.float32)
    if len(sample) < s.num_clusters:
        raise InputError(f"tag.clusters.num_clusters: {s.num_clusters} clusters need as many samples, and the "
                         f"build's sample has {len(sample)} (tag.clusters.sample_fraction {s.sample_fraction}): "
                         "lower num_clusters, raise sample_fraction, or give tag.clusters.centroids")
    log.info("k-means: %d clusters over %d sampled embeddings", s.num_clusters, len(sample))
    return train(sample, s.num_clusters, s.niter, s.seed), len(sample)


def run(cfg) -> None:
    s = cfg.tag.clusters
    counts = Counts()
    with atomic_dir(CLUSTERS) as out:
        if not s.enabled:
            pq.write_table(SCHEMA.empty_table(), out / "clusters.parquet")
            counts.save(out, enabled=False)
            return
        centroids, sampled = _centroids(cfg)
        targets = []
        for i, url in enumerate(s.targets):
            emb = load_embeddings(local(url, f"tag.clusters.targets.{i}"), f"tag.clusters.targets.{i}")
            if emb.shape[1] != centroids.shape[1]:
                raise InputError(f"tag.clusters.targets.{i}: {url} has {emb.shape[1]}-d embeddings and the centroids "
                                 f"are {centroids.shape[1]}-d: give targets embedded by the model the build clusters "
                                 f"(tag.clusters.model)")
            targets.append(nearest(emb, centroids))
        target_ids = np.unique(np.concatenate(targets)) if targets else np.zeros(0, np.int64)
        with pq.ParquetWriter(out / "clusters.parquet", SCHEMA) as writer:
            total = kept = 0
            for part in cfg.subset.parts:
                keys, emb = image_embeddings(part, s.model, normalise=False)
                if emb.shape[1] != centroids.shape[1]:
                    raise InputError(f"tag.clusters.centroids: {centroids.shape[1]}-d centroids and part {part}'s "
                                     f"embeddings are {emb.shape[1]}-d: give centroids of the model the build "
                                     "clusters (tag.clusters.model)")
                ids = nearest(emb, centroids)
                inside = np.isin(ids, target_ids)
                writer.write_table(pa.table({"key": pa.array(keys, pa.string()), "cluster": ids.astype(np.int32),
                                             "in_target_cluster": inside}, schema=SCHEMA))
                total, kept = total + len(keys), kept + int(inside.sum())
        np.save(out / "centroids.npy", centroids)
        np.save(out / "target_clusters.npy", target_ids)
        counts.save(out, enabled=True, clustered=total, in_target_clusters=kept, num_clusters=len(centroids),
                    sampled=sampled, target_clusters=len(target_ids))
    log.info("clusters: %d samples, %d in %d target clusters of %d", total, kept, len(target_ids), len(centroids))
