"""index: autofaiss builds a kNN index over the selected image embeddings
(`data/index/image.index`, loadable by `faiss.read_index`, + `image_infos.json`), beside the
metadata of the indexed rows in id order (`metadata/`, linked from data/embeddings) and
`indices.json`, so `clip-retrieval back --indices_paths data/index/indices.json` serves the
folder as it is (run from the project root: its paths are relative to it); then measures
it (`data/metrics/index.json`, DVC metrics): with `index.report_queries` of the selected
samples' *text* embeddings as queries (text-to-image search, what `query` does), recall@1 (the
index's top hit is the exact top hit) and recall@10 (share of the exact top 10 found in the
index's top 10) against an exact inner-product search, p50/p99 latency of one query at a time,
and the index's size.

An unmaterialised build (`assemble.materialize=false`: data/embeddings holds only the marker)
gets an index over **every embedded sample** instead (data/embed of every part, in build order),
with `metadata/` of those rows and `parts.json` (each part's first id and count): it depends on
nothing a sweep point changes, so DVC builds it once and skips it at every later point; `query`,
`serve` and the report apply the point's selection as a faiss id filter
(laionbuild/project/index_filter.py). index.json then measures the unfiltered index."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid

import numpy as np
import pyarrow.parquet as pq

from laionbuild.project.atomic import atomic_dir, read_json, write_json
from laionbuild.project.files import numbered
from laionbuild.project.index_filter import PARTS_FILE, all_samples_index, embedded_parts, embedding_files
from laionbuild.project.layout import INDEX, INDEX_METRICS, KEY_COLUMN, TMP, embed_dir, embeddings_dir, part_dir
from laionbuild.project.outputs import materialized
from laionbuild.shards.storage import filesystem, join

log = logging.getLogger(__name__)


def run(cfg) -> None:
    c = cfg.index
    distributed, staged = {}, None
    parts = None if materialized() else embedded_parts(cfg.subset.parts, c.model)
    if parts is None:
        source = embeddings_dir(c.model)
        embeddings = str((source / "img_emb").resolve())  # absolute: read by executors on Spark
    else:  # every embedded sample: each part's file linked under a name whose order is build order
        if not parts:
            raise RuntimeError("index: no part has an embedded sample; nothing to index")
        source = part_dir("embed", parts[0]["part"]).parent
        linked = TMP / f"index_embeddings.{uuid.uuid4().hex[:12]}"
        linked.mkdir(parents=True)
        for i, entry in enumerate(parts):
            target = (embed_dir(entry["part"], c.model) / "img_emb" / "img_emb_0.npy").resolve()
            blocked = _blocked_rows(entry["part"])
            if len(blocked):  # samples an image hash list names: zero vectors (ids stay rows), no metadata
                emb = np.load(target)
                emb[blocked] = 0
                np.save(linked / f"img_emb_{i:06d}.npy", emb)
                entry["blocked"] = int(len(blocked))
            else:  # (the common case: a link, no copy)
                (linked / f"img_emb_{i:06d}.npy").symlink_to(target)
        embeddings = str(linked.resolve())
    if cfg.engine.name == "spark":
        # autofaiss's own Spark path: trained on the driver, vectors added by one task per slice
        # of the embeddings, the task indices merged through a folder every executor reaches
        from laionbuild.engine.spark import spark_session

        spark_session(cfg.engine)
        shared = cfg.engine.shared_tmp or str((TMP / "autofaiss_indices").resolve())
        distributed = {"distributed": "pyspark", "temporary_indices_folder": shared}  # (+ a uuid; removed after)
        if cfg.engine.shared_tmp:  # executors on other machines read the embeddings from there too
            staged = join(cfg.engine.shared_tmp, f"index_embeddings.{uuid.uuid4().hex[:12]}")
            fs, root = filesystem(staged)
            fs.put(f"{embeddings}/", f"{root}/", recursive=True)
            embeddings = staged
    try:
        _build(cfg, c, source, embeddings, distributed, parts)
    finally:
        if staged:
            fs.rm(root, recursive=True)
        if parts is not None:
            shutil.rmtree(linked, ignore_errors=True)
    report(cfg)


def _build(cfg, c, source, embeddings: str, distributed: dict, parts: list | None = None) -> None:
    import faiss
    from autofaiss import build_index

    if parts is None:
        _named_in_order("img_emb", c.model)  # name order is row order (checked before autofaiss numbers them)
    with atomic_dir(INDEX) as out:
        build_index(
            embeddings=embeddings,
            index_path=str(out / "image.index"),
            index_infos_path=str(out / "image_infos.json"),
            index_key=c.index_key,
            metric_type=c.metric_type,
            max_index_memory_usage=c.max_index_memory_usage,
            current_memory_available=c.current_memory_available,
            max_index_query_time_ms=c.max_index_query_time_ms,
            nb_cores=c.nb_cores or os.cpu_count(),
            save_on_disk=True,
            verbose=logging.WARNING,
            **distributed,
        )
        index = faiss.read_index(str(out / "image.index"))
        spec = cfg.embed.extra_models[c.model] if c.model else cfg.embed
        model = {"embeddings": str(source), "name": c.model, "model": spec.model, "pretrained": spec.pretrained}
        if parts is None:
            write_json(out / "model.json", model)
            _clip_back_layout(cfg, out, spec, numbered(source / "metadata", "metadata", ".parquet"), link=True)
        else:
            write_json(out / "model.json", {**model, "samples": "all embedded (assemble.materialize=false)"})
            write_json(out / PARTS_FILE, parts)
            _clip_back_layout(cfg, out, spec, _all_metadata(parts, out / "metadata"), link=False)
            if index.ntotal != sum(p["count"] for p in parts):
                raise RuntimeError(f"index: {index.ntotal} vectors indexed, {sum(p['count'] for p in parts)} embedded")
        log.info("index: %s with %d vectors", type(index).__name__, index.ntotal)


def _blocked_rows(part: int) -> np.ndarray:
    """The rows of part `part`'s embeddings whose samples the screen stage matched (image hash
    lists): a selection never holds them, and the all-samples index keeps neither their vectors
    (zeroed) nor their url, caption or tags, so data/index holds nothing of them but the key."""
    from laionbuild.project.outputs import screened_keys

    blocked = screened_keys(part)
    if not blocked:
        return np.zeros(0, np.int64)
    keys = pq.read_table(part_dir("embed", part) / "metadata" / "metadata_0.parquet",
                         columns=[KEY_COLUMN]).column(KEY_COLUMN).to_pylist()
    return np.flatnonzero([str(k) in blocked for k in keys])


def _all_metadata(parts: list, folder) -> list:
    """`metadata/metadata_NNNNNN.parquet` of every embedded sample, one file per part in build
    order (row i over the files = index id i): key, url, caption and tags, the columns
    data/embeddings/metadata has (only the key of a screened sample). Memory: one part's rows."""
    from laionbuild.shards.samples import part_rows

    folder.mkdir()
    files = []
    for i, entry in enumerate(parts):
        keys = pq.read_table(part_dir("embed", entry["part"]) / "metadata" / "metadata_0.parquet",
                             columns=[KEY_COLUMN]).column(KEY_COLUMN).to_pylist()
        path = folder / f"metadata_{i:06d}.parquet"
        rows = part_rows(entry["part"], [str(k) for k in keys]).drop(columns=["part"])
        blocked = _blocked_rows(entry["part"]) if entry.get("blocked") else []
        if len(blocked):
            rows.loc[rows.index[blocked], [c for c in rows.columns if c != "key"]] = None
        rows.to_parquet(path, index=False)
        files.append(path)
    return files


def _clip_back_layout(cfg, out, spec, files: list, link: bool) -> None:
    """`metadata/` (clip-retrieval back's metadata provider reads `<folder>/metadata/*.parquet`,
    row i = index id i: data/embeddings' metadata, whose rows follow the image embeddings; `link`:
    hard links to those files where the filesystem allows: no second copy in the workspace, DVC's
    cache holds one object per content anyway) and `indices.json` (`clip-retrieval back
    --indices_paths`)."""
    from laionbuild.models.clip import clip_retrieval_model

    if link:
        (out / "metadata").mkdir()
        for path in files:
            try:
                os.link(path, out / "metadata" / path.name)
            except OSError:
                shutil.copy2(path, out / "metadata" / path.name)
    columns = pq.read_schema(files[0]).names
    write_json(out / "indices.json", {cfg.recipe.name: {
        "indice_folder": str(INDEX),
        "clip_model": clip_retrieval_model(spec),
        "columns_to_return": columns,
        "enable_mclip_option": False,  # multilingual CLIP exists for ViT-B/32 and ViT-L/14 only (from the HF hub)
        "use_jit": False,
        "provide_safety_model": False, "provide_violence_detector": False, "provide_aesthetic_embeddings": False,
    }})


def _files(kind: str, model: str | None = None) -> list:
    """The embedding files in row order, which must be their name order: autofaiss reads them
    sorted by name, so an index id is a row number only when the two agree (assemble pads the
    file numbers). An all-samples index: the indexed parts' data/embed files, in id order."""
    if all_samples_index():
        return embedding_files(kind, model)
    return _named_in_order(kind, model)


def _named_in_order(kind: str, model: str | None = None) -> list:
    files = numbered(embeddings_dir(model) / kind, kind, ".npy")
    if files != sorted(files, key=lambda p: p.name):
        raise RuntimeError(f"{files[0].parent}: file names do not sort in row order ({files[0].name} ... "
                           f"{files[-1].name}); autofaiss would number the rows otherwise: rebuild assemble and what follows "
                           "(`dvc repro --force --no-run-cache assemble` and `laionbuild build`; dvc.yaml's assemble "
                           "cmd should read `laionbuild stage assemble --layout 2`)")
    return files


def _rows(kind: str, wanted: np.ndarray, model: str | None = None) -> np.ndarray:
    """Rows `wanted` (sorted global row numbers) of data/embeddings/<kind>, as float32, reading
    only those rows of each file (memory-mapped)."""
    found, start = [], 0
    for path in _files(kind, model):
        array = np.load(path, mmap_mode="r")
        mine = wanted[(wanted >= start) & (wanted < start + len(array))] - start
        if len(mine):
            found.append(np.asarray(array[mine], np.float32))
        start += len(array)
    return np.concatenate(found) if found else np.zeros((0, 0), np.float32)


def exact_search(queries: np.ndarray, k: int, model: str | None = None, chunk: int = 262_144) -> np.ndarray:
    """Exact inner-product top k of `queries` over all image embeddings, streamed a chunk at a
    time (memory: one chunk, whatever the index's size). Ties break toward the lower row."""
    import faiss

    best_d = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    start = 0
    for path in _files("img_emb", model):
        array = np.load(path, mmap_mode="r")
        for offset in range(0, len(array), chunk):
            block = np.ascontiguousarray(array[offset:offset + chunk], np.float32)
            flat = faiss.IndexFlatIP(block.shape[1])
            flat.add(block)
            d, i = flat.search(queries, min(k, len(block)))
            d = np.concatenate([best_d, d], axis=1)
            i = np.concatenate([best_i, np.where(i >= 0, i + start + offset, -1)], axis=1)
            order = np.lexsort((i, -d), axis=1)[:, :k]
            best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
        start += len(array)
    return best_i


def report(cfg) -> dict:
    import faiss

    c = cfg.index
    index = faiss.read_index(str(INDEX / "image.index"))
    n = int(index.ntotal)
    # text-to-image queries (what `query --text` does); image-to-image when the build has no text
    # embeddings (embeddings taken from the source)
    kind = "text_emb" if _files("text_emb", c.model) else "img_emb"
    queries = np.random.default_rng(c.report_seed).choice(n, size=min(c.report_queries, n), replace=False) if n else []
    q = np.ascontiguousarray(_rows(kind, np.sort(queries), c.model)) if len(queries) else np.zeros((0, index.d), np.float32)
    k = min(10, n)
    result = {"vectors": int(index.ntotal), "index_key": read_json(INDEX / "image_infos.json").get("index_key"),
              "size_bytes": (INDEX / "image.index").stat().st_size, "queries": len(q),
              "query_kind": kind.split("_")[0]}
    if len(q) and k:
        truth = exact_search(q, k, c.model)
        _, found = index.search(q, k)
        result["recall_at_1"] = float(np.mean(found[:, 0] == truth[:, 0]))
        result["recall_at_10"] = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))
        latencies = []
        for row in q:
            start = time.perf_counter()
            index.search(row[None, :], k)
            latencies.append((time.perf_counter() - start) * 1000)
        result["latency_ms_p50"] = float(np.percentile(latencies, 50))
        result["latency_ms_p99"] = float(np.percentile(latencies, 99))
    write_json(INDEX_METRICS, result)
    log.info("index report: %s", result)
    return result
