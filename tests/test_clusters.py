"""DataComp's image-based rule (tag.clusters, the clusters stage, select.in_target_clusters) on a
stand-in pool in DataComp's layout (tests/test_datacomp.py writes it): the kept uids equal what
DataComp's baselines compute over the same files — k-means as image_based_clustering.py trains
it (faiss Clustering, L2, 20 iterations, every point), the target clusters and each sample's
cluster by the largest inner product (get_centroid_ids_gpu), after the caption filter (English,
more than one word and five characters)."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pytest
import torch

from laionbuild.metadata.language import detect
from laionbuild.recipe.schema import RecipeError, compose

from .conftest import ROOT
from .test_datacomp import datacomp_uids, write_pool

K = 6


@pytest.fixture
def pool(tmp_path):
    root = tmp_path / "datacomp_small" / "metadata"
    return root, write_pool(root, rows=(60, 45, 50), seed=3)


def caption_filter(rows: pd.DataFrame) -> pd.Series:
    english = pd.Series(detect(rows.text.tolist()), index=rows.index) == "en"
    return english & (rows.text.str.split().str.len() > 1) & (rows.text.str.len() > 5)


def datacomp_kmeans(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    clustering = faiss.Clustering(features.shape[1], k)
    clustering.niter, clustering.seed, clustering.max_points_per_centroid = 20, seed, 10_000_000
    clustering.train(np.ascontiguousarray(features, np.float32), faiss.IndexFlatL2(features.shape[1]))
    return faiss.vector_float_to_array(clustering.centroids).reshape(k, -1)


def write_targets(tmp_path, rows, n=(5, 4), seed=7) -> tuple[list[str], np.ndarray]:
    """Target embeddings as DataComp ships ImageNet-1k's: torch.save'd dicts of `image_features`
    (tensors), here near a few of the pool's own images so that some clusters are targets."""
    rng = np.random.default_rng(seed)
    pool = np.stack(rows.l14_img.tolist()).astype(np.float32)
    paths, arrays = [], []
    for i, count in enumerate(n):
        near = pool[rng.choice(len(pool), count, replace=False)] + 0.01 * rng.standard_normal((count, pool.shape[1]))
        path = tmp_path / f"in1k_clip_vit_l14_{i}.pt"
        torch.save({"image_features": torch.from_numpy(near.astype(np.float32))}, path)
        paths.append(str(path))
        arrays.append(near.astype(np.float32))
    return paths, np.concatenate(arrays)


def test_image_based_recipe_keeps_datacomps_uids(project, pool, tmp_path):
    root, rows = pool
    targets, target_emb = write_targets(tmp_path, rows)
    filtered = rows[caption_filter(rows)]
    features = np.stack(filtered.l14_img.tolist()).astype(np.float32)  # shard order, then row order
    centroids = datacomp_kmeans(features, K)
    target_ids = np.unique((target_emb @ centroids.T).argmax(axis=1))
    keep = np.isin((features @ centroids.T).argmax(axis=1), target_ids)
    assert 0 < keep.sum() < len(filtered) < len(rows) and len(target_ids) < K
    project.build_in_process("recipe=datacomp_image_based", f"source.base_url={root}", "subset.parts=[0,1,2]",
                             f"tag.clusters.num_clusters={K}", f"tag.clusters.targets=[{','.join(targets)}]",
                             until="select")
    assert np.load(project / "data/selected/uids.npy").tobytes() == datacomp_uids(filtered.uid[keep]).tobytes()
    np.testing.assert_allclose(np.load(project / "data/clusters/centroids.npy"), centroids, rtol=1e-5, atol=1e-6)
    assert np.load(project / "data/clusters/target_clusters.npy").tolist() == target_ids.tolist()
    stats = json.loads((project / "data/selected/stats.json").read_text())
    assert stats["counts"]["after_in_target_clusters"] == keep.sum() == stats["counts"]["selected"]
    clusters = json.loads((project / "data/clusters/stats.json").read_text())
    assert (clusters["clustered"], clusters["in_target_clusters"], clusters["sampled"]) == (len(filtered), keep.sum(),
                                                                                           len(filtered))


def test_given_centroids_and_a_seeded_sample(project, pool, tmp_path):
    """Centroids from a file (DataComp publishes its pools' as torch.save'd arrays) are used as
    they are; k-means over a sample draws the same rows every build."""
    root, rows = pool
    targets, target_emb = write_targets(tmp_path, rows)
    given = np.random.default_rng(1).standard_normal((K, 768)).astype(np.float32)
    torch.save(given, tmp_path / "small_centroids.pt")
    project.build_in_process("recipe=datacomp_image_based", f"source.base_url={root}", "subset.parts=[0,1,2]",
                             f"tag.clusters.centroids={tmp_path / 'small_centroids.pt'}",
                             f"tag.clusters.targets=[{','.join(targets)}]", "prepare.languages=null", until="select")
    features = np.stack(rows.l14_img.tolist()).astype(np.float32)
    import pyarrow.parquet as pq

    table = pq.read_table(project / "data/clusters/clusters.parquet").to_pandas()
    assert len(table) == len(rows[(rows.text.str.split().str.len() > 1) & (rows.text.str.len() > 5)])
    by_key = dict(zip(table.key, table.cluster))
    assert np.load(project / "data/clusters/centroids.npy").tobytes() == given.tobytes()
    assert np.load(project / "data/clusters/target_clusters.npy").tolist() == \
        np.unique((target_emb @ given.T).argmax(axis=1)).tolist()
    # each sample's cluster: the largest inner product with a given centroid
    keys = pq.read_table(project / "data/tags/part_0/tags.parquet", columns=["key", "uid"]).to_pandas()
    for key, uid in zip(keys.key, keys.uid):
        row = features[rows.index[rows.uid == uid][0]]
        assert by_key[key] == int((given @ row).argmax())

    def sampled_centroids() -> bytes:
        project.build_in_process("recipe=datacomp_image_based", f"source.base_url={root}", "subset.parts=[0,1,2]",
                                 f"tag.clusters.num_clusters={K}", "tag.clusters.sample_fraction=0.5",
                                 f"tag.clusters.targets=[{','.join(targets)}]", until="clusters")
        stats = json.loads((project / "data/clusters/stats.json").read_text())
        assert K <= stats["sampled"] < stats["clustered"]
        return (project / "data/clusters/centroids.npy").read_bytes()

    assert sampled_centroids() == sampled_centroids()


def test_more_clusters_than_samples_is_a_clear_error(project, pool, tmp_path):
    root, rows = pool
    targets, _ = write_targets(tmp_path, rows)
    with pytest.raises(Exception, match=r"tag\.clusters\.num_clusters: 1000 clusters need as many samples"):
        project.build_in_process("recipe=datacomp_image_based", f"source.base_url={root}", "subset.parts=[0,1,2]",
                                 "tag.clusters.num_clusters=1000", f"tag.clusters.targets=[{','.join(targets)}]",
                                 until="clusters")


def test_the_rule_needs_its_clusters_and_targets(pool, tmp_path):
    root, _ = pool
    with pytest.raises(RecipeError, match=r"tag\.clusters\.targets\.0.*must be given"):
        compose(["recipe=datacomp_image_based", f"source.base_url={root}"], conf_dir=ROOT / "conf")
    with pytest.raises(RecipeError, match=r"select\.in_target_clusters.*tag\.clusters\.enabled"):
        compose(["recipe=datacomp_clip_score", f"source.base_url={root}", "select.in_target_clusters=true"],
                conf_dir=ROOT / "conf")
    with pytest.raises(RecipeError, match=r"tag\.clusters\.targets\.0.*is not a file"):
        compose(["recipe=datacomp_image_based", f"source.base_url={root}",
                 f"tag.clusters.targets=[{tmp_path / 'missing.pt'}]"], conf_dir=ROOT / "conf")


def test_datacomp_1b_rule_takes_the_score_threshold_over_the_whole_pool(project, pool, tmp_path):
    """datacomp_image_clip: image-based ∩ top 30% by L/14 score, the threshold DataComp's
    get_threshold over every row of the pool (before the caption filter), not over the rows
    that pass it: the two thresholds differ here, and the uids are DataComp's."""
    root, rows = pool
    targets, target_emb = write_targets(tmp_path, rows)
    passed = caption_filter(rows)
    features = np.stack(rows.l14_img[passed].tolist()).astype(np.float32)
    centroids = datacomp_kmeans(features, K)
    target_ids = np.unique((target_emb @ centroids.T).argmax(axis=1))
    in_target = pd.Series(False, index=rows.index)
    in_target[passed[passed].index] = np.isin((features @ centroids.T).argmax(axis=1), target_ids)
    score = rows.clip_l14_similarity_score
    pool_threshold = -np.sort(-score.values)[int(len(rows) * 0.3)]
    assert pool_threshold != -np.sort(-score[passed].values)[int(passed.sum() * 0.3)]
    keep = passed & in_target & (score >= pool_threshold)
    assert 0 < keep.sum() < (passed & in_target).sum()
    project.build_in_process("recipe=datacomp_image_clip", f"source.base_url={root}", "subset.parts=[0,1,2]",
                             f"tag.clusters.num_clusters={K}", f"tag.clusters.targets=[{','.join(targets)}]",
                             until="select")
    assert np.load(project / "data/selected/uids.npy").tobytes() == datacomp_uids(rows.uid[keep]).tobytes()
    stats = json.loads((project / "data/selected/stats.json").read_text())
    assert stats["top_fraction_thresholds"] == {"clip_l14_similarity_score": float(pool_threshold)}
    # a tag column by its canonical name: width is the pool's original_width (source=datacomp's mapping)
    project.build_in_process("recipe=datacomp_image_clip", f"source.base_url={root}", "subset.parts=[0,1,2]",
                             f"tag.clusters.num_clusters={K}", f"tag.clusters.targets=[{','.join(targets)}]",
                             "~select.top_fraction.clip_l14_similarity_score", "+select.top_fraction.width=0.3",
                             until="select")
    stats = json.loads((project / "data/selected/stats.json").read_text())
    width = rows.original_width.values
    assert stats["top_fraction_thresholds"] == {"width": float(-np.sort(-width)[int(len(rows) * 0.3)])}
