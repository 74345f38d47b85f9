"""DataComp's image-based rule as laionbuild computes it (tag.clusters; the global clusters
stage): k-means centroids of the pool's image embeddings (faiss, L2, as DataComp's
baselines/image_based_clustering.py trains them), the *target clusters* (each target embedding,
e.g. an ImageNet-1k training image's, assigned to its nearest centroid) and each sample's
nearest centroid. "Nearest" is the largest inner product with the centroid, as DataComp's
get_centroid_ids_gpu assigns (the embeddings are not normalised again).

Cost at scale: assigning N samples to k centroids is N·k·d multiply-adds (DataComp medium:
128M × 100k × 768 ≈ 10^16, GPU work; faiss uses the GPU build where installed); training holds
the sample in memory (4·d bytes per sampled row: 0.3 of 128M L/14 rows ≈ 118 GB, so sample less
or give DataComp's published centroids as `tag.clusters.centroids`)."""

from __future__ import annotations

import io
from pathlib import Path

import fsspec
import numpy as np

from laionbuild.recipe.errors import InputError


def load_embeddings(url: str, key: str) -> np.ndarray:
    """A 2-D float32 array from a .npy, a .npz (its only array, or `image_features`) or a
    torch.save'd .pt (an array, a tensor, or a dict holding `image_features` as DataComp's
    ImageNet-1k files do), local or any fsspec URL. `key` names the recipe key in errors."""
    try:
        with fsspec.open(url, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise InputError(f"{key}: cannot read {url}: {exc}") from None
    name = url.split("?")[0].lower()
    try:
        if name.endswith(".pt") or name.endswith(".pth"):
            from laionbuild.metadata.ids import safe_torch_load

            value = safe_torch_load(io.BytesIO(data))
        else:
            value = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise InputError(f"{key}: {url} is not a .npy, .npz or .pt array file ({type(exc).__name__}: {exc})") from None
    if isinstance(value, dict) or hasattr(value, "files"):
        names = list(value.keys()) if isinstance(value, dict) else list(value.files)
        if "image_features" in names:
            value = value["image_features"]
        elif len(names) == 1:
            value = value[names[0]]
        else:
            raise InputError(f"{key}: {url} holds {names}: store one array, or the embeddings as `image_features`")
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().float().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != 2 or not len(array) or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{key}: {url} holds a {array.dtype} array of shape {array.shape}: "
                         "it needs one embedding per row (2-D, numeric)")
    return np.ascontiguousarray(array, dtype=np.float32)


def train(sample: np.ndarray, num_clusters: int, niter: int, seed: int) -> np.ndarray:
    """k-means centroids (num_clusters × d) of `sample`, with DataComp's settings: faiss
    Clustering, L2, `niter` iterations, every point used (no sub-sampling per centroid)."""
    import faiss

    d = sample.shape[1]
    clustering = faiss.Clustering(d, num_clusters)
    clustering.niter = niter
    clustering.seed = seed
    clustering.max_points_per_centroid = 10_000_000
    clustering.train(np.ascontiguousarray(sample, dtype=np.float32), faiss.IndexFlatL2(d))
    return faiss.vector_float_to_array(clustering.centroids).reshape(num_clusters, d)


def nearest(embeddings: np.ndarray, centroids: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Each row's nearest centroid: the largest inner product (ties: the lowest index)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    out = np.empty(len(embeddings), np.int64)
    for start in range(0, len(embeddings), batch):
        _, at = index.search(np.ascontiguousarray(embeddings[start:start + batch], dtype=np.float32), 1)
        out[start:start + batch] = at[:, 0]
    return out


def local(path: str, key: str) -> str:
    """The file to read for `path` (a recipe's centroid or target file, recorded in
    data/inputs/clusters.json): local as it is, remote as the copy of the recorded version."""
    from laionbuild.project.inputs import local_copy

    return str(local_copy(path if "://" in path else str(Path(path).expanduser()), "clusters.json", key))
