"""Searching an unmaterialised point (assemble.materialize=false): the index covers every embedded
sample once, `query` / `serve` / the report search it with the point's selection as a faiss id
filter, and a second point does not rebuild it. A copy of the shared demo build, real DVC, real
autofaiss/faiss, a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request

import faiss
import numpy as np
import pandas as pd
import pytest
import yaml

from .conftest import BIN, FAST, build_env
from .shared_demo import RECIPE, copy_of, shared_demo

POINT = [*FAST, *RECIPE, "assemble.materialize=false"]


def similarities(project) -> np.ndarray:
    return np.sort(np.concatenate([pd.read_parquet(project / f"data/tags/part_{p}/tags.parquet")["clip_similarity"]
                                   for p in (0, 1)]))


def build_point(project, threshold: float):
    return project.laionbuild("build", "--stage", "report", *POINT, f"select.min_clip_similarity={threshold!r}")


@pytest.fixture(scope="module")
def point(tmp_path_factory):
    shared, _ = shared_demo(tmp_path_factory)
    project = copy_of(shared, tmp_path_factory.mktemp("point") / "project")
    sims = similarities(project)
    result = build_point(project, float(sims[len(sims) // 2]))  # keeps about half of the tagged samples
    return project, result


def embedded(project) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every embedded sample in build order (parts 0, 1; key order): keys, image and text embeddings."""
    keys, img, text = [], [], []
    for part in (0, 1):
        base = project / f"data/embed/part_{part}"
        keys += pd.read_parquet(base / "metadata/metadata_0.parquet")["laionbuild_key"].astype(str).tolist()
        img.append(np.load(base / "img_emb/img_emb_0.npy").astype(np.float32))
        text.append(np.load(base / "text_emb/text_emb_0.npy").astype(np.float32))
    return keys, np.concatenate(img), np.concatenate(text)


def selected(project) -> list[str]:
    return pd.read_parquet(project / "data/selected/selected.parquet")["key"].astype(str).tolist()


def exact_top(query: np.ndarray, img: np.ndarray, rows: np.ndarray) -> int:
    """The exact inner-product nearest of `rows` to `query` (ties: the lower row)."""
    scores = img[rows] @ query
    return int(rows[np.flatnonzero(scores == scores.max())[0]])


def tree(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_the_index_covers_every_embedded_sample_once(point):
    project, result = point
    assert {"select", "assemble", "index", "report"} <= set(result.ran)
    assert [p.name for p in (project / "data/embeddings").iterdir()] == ["UNMATERIALIZED.json"]
    keys, img, _ = embedded(project)
    chosen = selected(project)
    assert 0 < len(chosen) < len(keys)
    index = faiss.read_index(str(project / "data/index/image.index"))
    assert index.ntotal == len(keys)
    meta = pd.concat([pd.read_parquet(p) for p in sorted((project / "data/index/metadata").glob("*.parquet"))])
    assert len(list((project / "data/index/metadata").iterdir())) == 2  # one file per part
    assert meta["key"].tolist() == keys  # id i is the i-th embedded sample in build order
    assert {"url", "caption", "clip_similarity"} <= set(meta.columns)
    parts = json.loads((project / "data/index/parts.json").read_text())
    assert [(p["part"], p["first_id"]) for p in parts] == [(0, 0), (1, parts[0]["count"])]
    assert sum(p["count"] for p in parts) == len(keys)
    normed = img / np.linalg.norm(img, axis=1, keepdims=True)
    sims = normed @ normed.T
    np.fill_diagonal(sims, -1)
    unique = np.flatnonzero(sims.max(axis=1) < 0.999)  # the demo repeats a picture under several captions
    _, found = index.search(img[unique], 1)
    assert found[:, 0].tolist() == unique.tolist()
    funnel = json.loads((project / "data/metrics/funnel.json").read_text())
    assert funnel["indexed"] == funnel["selected"] == len(chosen)


def _query_outside_the_selection(project) -> tuple[int, np.ndarray]:
    """A sample whose caption's exact nearest image (over every embedded sample) is not selected,
    and the selected rows: a search without the filter would answer that unselected sample."""
    keys, img, text = embedded(project)
    rows = np.flatnonzero(np.isin(keys, selected(project)))
    for i in range(len(keys)):
        if keys[exact_top(text[i], img, np.arange(len(keys)))] not in set(selected(project)):
            return i, rows
    raise AssertionError("every caption's nearest image is selected: the demo cannot tell a filter")


def test_query_returns_only_selected_samples(point):
    project, _ = point
    keys, img, text = embedded(project)
    i, rows = _query_outside_the_selection(project)
    captions = pd.concat([pd.read_parquet(p) for p in sorted((project / "data/index/metadata").glob("*.parquet"))])
    output = project.laionbuild("query", "--text", captions["caption"].iloc[i], "-k", "5", "--json").output
    found = json.loads(output[output.rindex("\n[") + 1:])
    assert len(found) == 5 and {r["key"] for r in found} <= set(selected(project))
    assert found[0]["key"] == keys[exact_top(text[i], img, rows)]
    assert found[0]["score"] == pytest.approx(float(img[keys.index(found[0]["key"])] @ text[i]), abs=1e-4)


def test_the_python_api_filters_every_query(point, monkeypatch):
    from laionbuild.explore.query import BuildIndex, search

    project, _ = point
    keys, img, text = embedded(project)
    rows = np.flatnonzero(np.isin(keys, selected(project)))
    monkeypatch.chdir(project.path)
    index = BuildIndex()
    assert len(index) == len(rows) and index.index.ntotal == len(keys)
    for q in text:
        scores, found = index.search(q[None, :], 10)
        assert len(found) == 10 and set(found.tolist()) <= set(rows.tolist())
        assert found[0] == exact_top(q, img, rows)
        assert [index.metadata.at[r, "key"] for r in found] == [keys[r] for r in found]
    assert {r["key"] for r in search(text[:1], len(keys))} == set(selected(project))  # k past the selection
    with pytest.raises(IndexError):
        index.embedding(int(np.setdiff1d(np.arange(len(keys)), rows)[0]))


@pytest.fixture(scope="module")
def server(point):
    project, _ = point
    proc = subprocess.Popen([str(BIN / "laionbuild"), "serve", "--port", "0"], cwd=project.path, env=build_env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    found = threading.Event()

    def drain() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "serving " in line:
                found.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.time() + 180
    while not found.is_set() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if not found.is_set():
        proc.kill()
        raise AssertionError("laionbuild serve did not start:\n" + "".join(lines[-50:]))
    match = re.search(r"serving demo \((\d+) samples\) on (http://127\.0\.0\.1:\d+)/", "".join(lines))
    yield match.group(2), int(match.group(1))
    proc.terminate()
    proc.wait(timeout=30)


def call(url: str, body=None) -> tuple[int, object]:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
            return response.status, json.loads(data) if response.headers.get_content_type() == "application/json" else data
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_answers_with_selected_samples_only(point, server):
    import laionbuild

    project, _ = point
    url, samples = server
    keys, img, text = embedded(project)
    chosen = set(selected(project))
    rows = np.flatnonzero(np.isin(keys, list(chosen)))
    assert samples == len(chosen)
    status, info = call(f"{url}/build-info")
    assert status == 200 and info["samples"] == len(chosen)
    i, _ = _query_outside_the_selection(project)
    for query in (text[i], img[i]):
        status, results = call(f"{url}/knn-service", {"embedding_input": query.tolist(), "num_images": 10})
        assert status == 200 and len(results) == 10
        assert {r["key"] for r in results} <= chosen and all(r["key"] == keys[r["id"]] for r in results)
        assert results[0]["id"] == exact_top(query, img, rows)
    status, image = call(f"{url}/image/{results[0]['id']}")
    sample = next(s for s in laionbuild.read(project.path) if s["__key__"] == results[0]["key"])
    assert status == 200 and image == sample["jpg"]  # from the download's shards, as materialising would copy it
    outside = int(np.setdiff1d(np.arange(len(keys)), rows)[0])
    for path, body in ((f"/image/{outside}", None), (f"/embedding/{outside}", None), ("/metadata", {"ids": [outside]})):
        status, error = call(url + path, body)
        assert status == 404 and "selection" in error["error"], path


def test_the_index_report_measures_the_filtered_search(point, tmp_path_factory):
    project, _ = point
    metrics = json.loads((project / "data/metrics/index_filtered.json").read_text())
    chosen = selected(project)
    keys, _, _ = embedded(project)
    assert metrics["filtered"] is True and metrics["vectors"] == len(keys) and metrics["selected"] == len(chosen)
    queries = yaml.safe_load((project / "params.yaml").read_text())["index"]["report_queries"]
    assert metrics["queries"] == min(len(chosen), queries) and metrics["query_kind"] == "text"
    assert metrics["outside_selection"] == 0 and metrics["short_results"] == 0.0
    assert metrics["selector_bytes"] == (len(keys) + 7) // 8
    # the demo's index is exact (autofaiss chose Flat for 61 vectors): filtered, it finds the exact top
    assert json.loads((project / "data/index/image_infos.json").read_text())["index_key"] == "Flat"
    assert metrics["recall_at_1"] == metrics["recall_at_10"] == 1.0
    assert 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p99"]
    unfiltered = json.loads((project / "data/metrics/index.json").read_text())
    assert unfiltered["vectors"] == len(keys)  # the index stage measures the index itself, once
    shared, _ = shared_demo(tmp_path_factory)  # a materialised build: nothing filtered
    assert json.loads((shared / "data/metrics/index_filtered.json").read_text()) == {"filtered": False}


def test_a_second_point_reuses_the_index(point, tmp_path, monkeypatch):
    from laionbuild.explore.query import BuildIndex

    project = copy_of(point[0], tmp_path / "project")
    before = tree(project / "data/index")
    first = set(selected(project))
    sims = similarities(project)
    result = build_point(project, float(sims[len(sims) // 4]))  # a looser threshold: more samples
    assert "select" in result.ran and "report" in result.ran
    assert "index" not in result.ran and "index" not in result.restored  # unchanged deps: skipped
    assert "Stage 'index' didn't change, skipping" in result.output
    assert tree(project / "data/index") == before
    second = set(selected(project))
    assert first < second
    assert json.loads((project / "data/metrics/index_filtered.json").read_text())["selected"] == len(second)
    assert project.status()["index"] == "built"
    keys, _, text = embedded(project)
    monkeypatch.chdir(project.path)
    _, found = BuildIndex().search(text[:1], len(keys))
    assert {keys[r] for r in found} == second  # the new point's selection, the same index


@pytest.mark.parametrize("key", ["Flat", "HNSW32", "IVF32,Flat", "PCA16,IVF32,Flat", "IVF32_HNSW16,PQ8x4fs"])
def test_the_filter_searches_as_the_index_is_set_up(key):
    """The search parameters keep the index's own settings (nprobe, efSearch: autofaiss tunes them
    on the index it saves): a filter that keeps every id gives the unfiltered results; one that
    keeps a tenth returns only those ids, and a flat index their exact nearest."""
    from laionbuild.project.index_filter import SelectionFilter

    rng = np.random.default_rng(0)
    x = rng.standard_normal((10_000, 32)).astype(np.float32)
    faiss.normalize_L2(x)
    index = faiss.index_factory(32, key, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = 8  # not the search parameters' default (1)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = 64  # nor 16
    queries = x[:50] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    everything = SelectionFilter(index, np.arange(len(x)))
    assert np.array_equal(index.search(queries, 10, params=everything.params)[1], index.search(queries, 10)[1])
    some = np.sort(rng.choice(len(x), 1000, replace=False))
    tenth = SelectionFilter(index, some)
    _, found = index.search(queries, 10, params=tenth.params)
    assert set(found[found >= 0].tolist()) <= set(some.tolist()) and (found >= 0).mean() > 0.9
    assert all(int(r) in tenth for r in some) and not any(int(r) in tenth for r in np.setdiff1d(np.arange(100), some))
    if key == "Flat":
        assert found[:, 0].tolist() == [exact_top(q, x, some) for q in queries]


def test_an_ivf_index_is_searched_with_the_nprobe_autofaiss_tuned(point, tmp_path, monkeypatch):
    """autofaiss saves an IVF index with the nprobe it tuned (here every list of 4): the filter's
    search parameters keep it, so the filtered search still reaches every selected sample (at the
    parameters' default nprobe=1 it would reach about a quarter)."""
    from laionbuild.explore.query import BuildIndex

    project = copy_of(point[0], tmp_path / "project")
    threshold = float(similarities(project)[len(similarities(project)) // 2])  # the point's own
    result = project.laionbuild("build", "--stage", "report", *POINT, f"select.min_clip_similarity={threshold!r}",
                                'index.index_key="IVF4,Flat"')
    assert "index" in result.ran
    infos = json.loads((project / "data/index/image_infos.json").read_text())
    assert infos["index_key"] == "IVF4,Flat" and infos["index_param"] == "nprobe=4"
    keys, img, text = embedded(project)
    chosen = set(selected(project))
    rows = np.flatnonzero(np.isin(keys, list(chosen)))
    monkeypatch.chdir(project.path)
    index = BuildIndex()
    assert faiss.extract_index_ivf(index.index).nlist == 4
    for q in text[:10]:
        _, found = index.search(q[None, :], len(keys))
        assert {keys[r] for r in found} == chosen and found[0] == exact_top(q, img, rows)
    metrics = json.loads((project / "data/metrics/index_filtered.json").read_text())
    assert metrics["recall_at_1"] == 1.0 and metrics["short_results"] == 0.0 and metrics["outside_selection"] == 0


def test_a_screened_sample_keeps_its_id_with_no_vector_and_no_metadata(point, tmp_path, monkeypatch):
    """An image hash list (select.image_blocklists) on an unmaterialised point: the all-samples
    index holds a zero vector and the bare key for each matched sample, ids unchanged, and no
    search returns it."""
    import glob

    import pyarrow.parquet as pq

    project = copy_of(point[0], tmp_path / "project")
    keys, _, text = embedded(project)
    shard_tables = sorted(glob.glob(str(project / "data/images/part_1/*.parquet")))
    rows = pq.read_table(shard_tables[0], columns=["laionbuild_key", "status", "sha256"]).to_pylist()
    listed = [r for r in rows if r["status"] == "success" and str(r["laionbuild_key"]) in keys][:2]
    assert len(listed) == 2
    (tmp_path / "list.txt").write_text("".join(r["sha256"] + "\n" for r in listed))
    rule = f"select.image_blocklists=[{{name: x, path: '{tmp_path / 'list.txt'}', match: image_sha256}}]"
    sims = similarities(project)
    result = project.laionbuild("build", "--stage", "report", *POINT, rule, f"select.min_clip_similarity={sims[0]!r}")
    assert "index" in result.ran  # (data/screened is its dependency)
    blocked = {str(r["laionbuild_key"]) for r in listed}
    ids = [keys.index(k) for k in sorted(blocked)]
    index = faiss.read_index(str(project / "data/index/image.index"))
    assert index.ntotal == len(keys)  # ids stay rows of data/embed
    for i in ids:
        assert not np.any(index.reconstruct(i))
    meta = pd.concat([pd.read_parquet(f) for f in sorted((project / "data/index/metadata").glob("*.parquet"))])
    assert meta["key"].astype(str).tolist() == keys
    gone = meta[meta["key"].astype(str).isin(blocked)]
    assert gone["url"].isna().all() and gone["caption"].isna().all()
    assert sum(p.get("blocked", 0) for p in json.loads((project / "data/index/parts.json").read_text())) == 2
    from laionbuild.explore.query import BuildIndex

    monkeypatch.chdir(project.path)
    _, found = BuildIndex().search(text[:1], len(keys))
    assert not {keys[r] for r in found} & blocked and len(found) == len(selected(project))
