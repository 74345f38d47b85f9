"""`laionbuild serve` over the shared demo build: its JSON API answers clip-retrieval's own client
(`ClipClient`) in clip-back's shape, and its page works in headless Chromium (type a query, get
results, click one, get its neighbours). The demo's model is untrained, so the checks are on
structure and on planted facts (an image's own embedding finds it first, with similarity 1),
never on what the results mean."""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
from clip_retrieval.clip_client import ClipClient

from .browser import chromium, screenshot
from .conftest import BIN, build_env
from .shared_demo import shared_demo


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return shared_demo(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def server(built):
    """The base URL of `laionbuild serve --port 0` running in the built project."""
    proc = subprocess.Popen([str(BIN / "laionbuild"), "serve", "--port", "0"], cwd=built.path, env=build_env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    found = threading.Event()

    def drain() -> None:  # keep reading: the server logs every request
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
    url = re.search(r"serving demo \(\d+ samples\) on (http://127\.0\.0\.1:\d+)/", "".join(lines)).group(1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def dataset(built):
    """The build's rows in index order: metadata (key, url, caption, tags) and image embeddings."""
    meta = pd.read_parquet(built / "data/embeddings/metadata/metadata_000000.parquet")
    emb = np.load(built / "data/embeddings/img_emb/img_emb_000000.npy").astype(np.float32)
    return meta, emb


def unique_rows(emb: np.ndarray) -> list[int]:
    """Rows whose image embedding no other row shares (the demo has the same picture under
    several captions: those tie)."""
    normed = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = normed @ normed.T
    np.fill_diagonal(sims, -1)
    return [i for i in range(len(emb)) if sims[i].max() < 0.99999]


def post(url: str, body) -> tuple[int, dict | list, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read(), response.headers.get("Content-Type")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("Content-Type")


def client(server: str, **kwargs) -> ClipClient:
    options = dict(indice_name="demo", num_images=5, deduplicate=False, use_safety_model=False,
                   use_violence_detector=False)
    return ClipClient(url=f"{server}/knn-service", **{**options, **kwargs})


def test_clip_retrieval_client_gets_clip_back_results(server, built, dataset):
    meta, _ = dataset
    caption = meta["caption"][0]
    results = client(server).query(text=caption)
    assert len(results) == 5
    for r in results:
        assert {"id", "similarity", "url", "caption"} <= set(r)
        assert isinstance(r["id"], int) and isinstance(r["similarity"], float)
        assert (r["url"], r["caption"], r["key"]) == tuple(meta.loc[r["id"], ["url", "caption", "key"]])
    assert [r["similarity"] for r in results] == sorted((r["similarity"] for r in results), reverse=True)
    # the same model and index as `laionbuild query`
    output = built.laionbuild("query", "--text", caption, "-k", "5", "--json").output
    expected = json.loads(output[output.rindex("\n[") + 1:])
    assert [r["key"] for r in results] == [e["key"] for e in expected]
    assert [r["similarity"] for r in results] == pytest.approx([e["score"] for e in expected], abs=1e-4)

    status, listed, _ = post(f"{server}/metadata", {"ids": [0, 3], "indice_name": "demo"})
    assert status == 200 and [m["id"] for m in listed] == [0, 3]
    assert [m["metadata"]["caption"] for m in listed] == meta["caption"][[0, 3]].tolist()
    with urllib.request.urlopen(f"{server}/indices-list", timeout=30) as response:
        assert json.loads(response.read()) == ["demo"]

    # clip-back: metadata for the first num_images, ids and similarities up to num_result_ids;
    # options it has and we do not are answered and reported, not refused (its client sends them)
    status, results, headers = post(f"{server}/knn-service", {
        "text": caption, "modality": "image", "num_images": 3, "num_result_ids": 8, "indice_name": "demo",
        "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": 9, "aesthetic_weight": 0.5})
    assert status == 200 and len(results) == 8
    assert all("caption" in r for r in results[:3]) and all(set(r) == {"id", "similarity"} for r in results[3:])
    assert headers["X-Laionbuild-Ignored"] == "use_safety_model, use_violence_detector, aesthetic_score"


def test_an_image_finds_itself_first(server, built, dataset, tmp_path):
    meta, emb = dataset
    rows = unique_rows(emb)[:3]
    assert rows
    for row in rows:
        status, body, _ = get(f"{server}/embedding/{row}")
        assert status == 200
        embedding = json.loads(body)["embedding"]
        np.testing.assert_allclose(embedding, emb[row], rtol=1e-6)
        first = client(server, num_images=3).query(embedding_input=embedding)[0]
        assert first["id"] == row and first["similarity"] == pytest.approx(float(emb[row] @ emb[row]), abs=1e-4)
    # by image: the picture's bytes from the dataset shard, sent base64 by ClipClient
    row = rows[0]
    key = meta["key"][row]
    with tarfile.open(sorted((built / "data/dataset").glob("*.tar"))[0]) as tar:
        image = tar.extractfile(f"{key}.jpg").read()
    (tmp_path / "query.jpg").write_bytes(image)
    first = client(server, num_images=1).query(image=str(tmp_path / "query.jpg"))[0]
    assert first["id"] == row and first["similarity"] > 0.99
    status, served, media_type = get(f"{server}/image/{row}")
    assert (status, served, media_type) == (200, image, "image/jpeg")  # thumbnails come from the shards


def test_tag_filters_and_deduplication(server, dataset):
    meta, emb = dataset
    threshold = float(meta["clip_similarity"].median())
    status, results, _ = post(f"{server}/knn-service", {
        "text": "anything", "modality": "image", "num_images": 1000, "indice_name": "demo",
        "tag_filters": {"clip_similarity": {"min": threshold}, "width": {"max": 300}}})
    assert status == 200
    expected = meta[(meta["clip_similarity"] >= threshold) & (meta["width"] <= 300)]
    assert sorted(r["id"] for r in results) == expected.index.tolist()
    assert all(r["clip_similarity"] >= threshold and r["width"] <= 300 for r in results)

    # deduplicate: no two results with the same picture (cosine >= 0.94, clip-back's rule)
    status, results, _ = post(f"{server}/knn-service", {"text": "anything", "modality": "image", "num_images": 1000,
                                                        "indice_name": "demo", "deduplicate": True})
    normed = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [r["id"] for r in results]
    sims = normed[ids] @ normed[ids].T
    np.fill_diagonal(sims, 0)
    assert status == 200 and 0 < len(ids) < len(emb) and sims.max() < 0.94


@pytest.mark.parametrize("body, status, message", [
    ({"text": "", "modality": "image", "num_images": 3}, 400, "the query is empty"),
    ({"text": "x", "modality": "image", "num_images": 3, "indice_name": "laion5B"}, 400, "unknown index `laion5B`"),
    ({"text": "x", "modality": "text", "num_images": 3}, 400, "image index only"),
    ({"image_url": "http://example.com/a.jpg", "modality": "image", "num_images": 3}, 400, "send the image"),
    ({"image": "bm90IGFuIGltYWdl", "modality": "image", "num_images": 3}, 400, "not a base64-encoded image"),
    ({"text": "x", "modality": "image", "num_images": 0}, 400, "`num_images`: expected a positive integer"),
    ({"text": "x", "tag_filters": {"aesthetic": {"min": 5}}}, 400, "no tag `aesthetic` in this build; tags: clip_similarity"),
    ({"embedding_input": [0.1, 0.2]}, 400, "index holds 32-dimensional"),
])
def test_errors_are_answered_with_a_message(server, body, status, message):
    got, answer, _ = post(f"{server}/knn-service", body)
    assert got == status and message in answer["error"]


def test_missing_things_are_404_with_a_message(server):
    status, body, media_type = get(f"{server}/image/9999")
    assert status == 404 and media_type == "application/json" and "not in the index" in json.loads(body)["error"]
    status, body, _ = get(f"{server}/nothing-here")
    assert status == 404 and "/nothing-here" in json.loads(body)["error"]
    got, answer, _ = post(f"{server}/knn-service", b"{not json")
    assert got == 400 and "JSON object" in answer["error"]


def test_search_page_in_chromium(server, dataset):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    meta, emb = dataset
    with chromium() as browser:
        wait = WebDriverWait(browser, 60)
        browser.get(server + "/")
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        assert "UNTRAINED" in browser.find_element(By.TAG_NAME, "body").text

        def results():
            return browser.find_elements(By.CSS_SELECTOR, "#results .result")

        def images_loaded():
            return browser.execute_script("return [...document.querySelectorAll('#results img')]"
                                          ".every(i => i.complete && i.naturalWidth > 0)")

        # type a query, get results with pictures, captions and scores
        browser.find_element(By.ID, "query").send_keys(meta["caption"][0])
        browser.find_element(By.ID, "search").click()
        wait.until(lambda b: len(results()) == 24 and images_loaded())
        assert re.fullmatch(r"24 results in \d+ ms", browser.find_element(By.ID, "status").text)
        first = results()[0]
        assert first.find_element(By.CLASS_NAME, "caption").text == meta["caption"][int(first.get_attribute("data-id"))]
        assert re.fullmatch(r"similarity -?\d\.\d{4}", first.find_element(By.CLASS_NAME, "score").text)
        screenshot(browser, "search-results", full_page=False)

        # click one, get its neighbours: itself first, with similarity 1
        target = next(r for r in results() if int(r.get_attribute("data-id")) in unique_rows(emb))
        row = int(target.get_attribute("data-id"))
        target.click()
        wait.until(lambda b: b.find_element(By.ID, "heading").text.startswith(f"Neighbours of #{row}:"))
        wait.until(lambda b: images_loaded() and results())
        assert int(results()[0].get_attribute("data-id")) == row
        assert float(results()[0].get_attribute("data-similarity")) == pytest.approx(1.0, abs=1e-4)
        screenshot(browser, "search-neighbours", full_page=False)

        # filter by a tag
        threshold = float(meta["clip_similarity"].median())
        browser.find_element(By.ID, "filter-min-clip_similarity").send_keys(f"{threshold:.6f}")
        browser.find_element(By.ID, "search").click()
        expected = int((meta["clip_similarity"] >= float(f"{threshold:.6f}")).sum())
        wait.until(lambda b: b.find_element(By.ID, "heading").text.startswith("Results for")
                   and len(results()) == min(24, expected))
        assert all(float(r.get_attribute("data-tag_clip_similarity")) >= float(f"{threshold:.6f}") for r in results())

        # an empty query: the server's message is shown, nothing else
        browser.find_element(By.ID, "query").clear()
        browser.find_element(By.ID, "filter-min-clip_similarity").clear()
        browser.find_element(By.ID, "search").click()
        error = browser.find_element(By.ID, "error")
        wait.until(lambda b: error.is_displayed())
        assert "the query is empty" in error.text and results() == []
        screenshot(browser, "search-error", full_page=False)
