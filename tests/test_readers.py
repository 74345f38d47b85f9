"""A build's outputs open in the ecosystem's readers as they are, with no glue: `clip-retrieval
back` serves `data/index/` (started for real, queried with `ClipClient`), Hugging Face
`datasets`, `webdataset` and `wids` read `data/dataset/`. All on the shared demo build."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from laionbuild.project.outputs import selected_keys

from .conftest import build_env
from .shared_demo import shared_demo

# open_clip knows every real architecture by name, so `clip-retrieval back --indices_paths
# data/index/indices.json` loads a real build's model as it is. The tests' `laionbuild-tiny` is
# laionbuild's own architecture config, which open_clip in another process does not know: the
# back end is clip-retrieval's own command line, run after registering that config.
CLIP_RETRIEVAL = ("from laionbuild.models.clip import register_model_configs; register_model_configs(); "
                  "from clip_retrieval.cli import main; main()")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project, result = shared_demo(tmp_path_factory)
    assert result.returncode == 0, result.output[-3000:]
    return project


def dataset_keys(project) -> list[str]:
    selected = pq.ParquetFile(project / "data/selected/selected.parquet")
    return [k for part in (0, 1) for k in selected_keys(selected, part)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_clip_retrieval_back_serves_the_index_folder_as_it_is(built):
    indices = json.loads((built / "data/index/indices.json").read_text())
    assert list(indices) == ["demo"] and indices["demo"]["indice_folder"] == "data/index"
    assert (built / "data/index/image.index").exists() and list((built / "data/index/metadata").glob("*.parquet"))
    port = free_port()
    # (clip-retrieval back listens on 0.0.0.0 -- its own choice, no option; the test talks to 127.0.0.1)
    back = subprocess.Popen([sys.executable, "-c", CLIP_RETRIEVAL, "back", "--indices_paths", "data/index/indices.json",
                             "--port", str(port)], cwd=built.path, env=build_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, listed = time.time() + 240, None
        while time.time() < deadline and back.poll() is None:
            try:
                listed = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/indices-list", timeout=5).read())
                break
            except OSError:
                time.sleep(1)
        assert listed == ["demo"], back.stdout.read() if back.poll() is not None else "clip-retrieval back did not start"

        from clip_retrieval.clip_client import ClipClient

        client = ClipClient(url=f"http://127.0.0.1:{port}/knn-service", indice_name="demo", num_images=5,
                            deduplicate=False, use_safety_model=False, use_violence_detector=False, aesthetic_weight=0)
        keys = dataset_keys(built)
        by_text = client.query(text="a photo of a cameraman")
        assert len(by_text) == 5 and {r["key"] for r in by_text} <= set(keys)
        assert all(r["caption"] and r["url"].startswith("http://demo.laionbuild.invalid/") for r in by_text)

        # an embedding query: every hit's id is its row in data/embeddings (the index's vector)
        # and in data/dataset order (the metadata clip-retrieval returns for it)
        embeddings = np.concatenate([np.load(p) for p in sorted((built / "data/embeddings/img_emb").glob("*.npy"))])
        meta = pd.concat(pd.read_parquet(p) for p in sorted((built / "data/embeddings/metadata").glob("*.parquet")))
        query = embeddings[len(embeddings) // 2].astype(np.float32)
        hits = client.query(embedding_input=query.tolist())
        exact = np.argsort(-(embeddings.astype(np.float32) @ query), kind="stable")[:5]
        assert sorted(r["id"] for r in hits) == sorted(exact.tolist())
        for hit in hits:
            assert hit["key"] == keys[hit["id"]] == meta["key"].iloc[hit["id"]]
            assert hit["similarity"] == pytest.approx(float(embeddings[hit["id"]].astype(np.float32) @ query), abs=1e-4)
    finally:
        back.terminate()
        back.wait(timeout=30)


def test_hugging_face_datasets_loads_the_shards(built, tmp_path):
    from datasets import load_dataset

    shards = sorted(str(p) for p in (built / "data/dataset").glob("*.tar"))
    dataset = load_dataset("webdataset", data_files={"train": shards}, split="train", cache_dir=str(tmp_path))
    keys = dataset_keys(built)
    assert dataset.num_rows == len(keys) > 0
    assert {"jpg", "txt", "json"} <= set(dataset.features)
    assert type(dataset.features["jpg"]).__name__ == "Image"
    assert dataset["__key__"] == keys  # build order
    row = dataset[0]
    assert row["jpg"].size[0] > 0 and row["txt"] == row["json"]["caption"] and row["json"]["key"] == keys[0]
    assert "clip_similarity" in row["json"]["tags"]


def test_webdataset_and_wids_read_the_shards(built):
    import webdataset
    import wids

    keys = dataset_keys(built)
    shards = sorted(str(p) for p in (built / "data/dataset").glob("*.tar"))
    rows = list(webdataset.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json"))
    assert [r[0] for r in rows] == keys
    assert all(image.size[0] > 0 and text == meta["caption"] for _, image, text, meta in rows)

    index = built / "data/dataset/shardindex.json"
    dataset = wids.ShardListDataset(str(index))  # shard paths relative to the index file
    assert len(dataset) == len(keys)
    for i in (0, len(keys) - 1):
        sample = dataset[i]
        assert sample["__key__"] == keys[i] and sample[".txt"] == sample[".json"]["caption"]
        assert sample[".jpg"].size[0] > 0


def _dataset_members(project) -> list[dict]:
    """data/dataset's tars as webdataset samples: {__key__, ext: bytes}, in shard order."""
    import tarfile

    samples: list[dict] = []
    for shard in sorted((project / "data/dataset").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


def test_read_gives_the_selection_byte_for_byte_as_assemble_writes_it(built):
    import laionbuild

    samples = list(laionbuild.read(built.path))
    assert [s["__key__"] for s in samples] == dataset_keys(built)
    assert samples == _dataset_members(built)  # every member, its bytes and its order


def test_a_selected_point_is_read_before_it_is_materialised(built, tmp_path):
    """A threshold change built only up to `select`: data/dataset still holds the old point,
    `laionbuild.read` the new one, straight from the download's shards (also through a
    webdataset pipeline); materialising it then writes exactly what was read."""
    import webdataset as wds

    import laionbuild

    from .shared_demo import RECIPE, copy_of

    project = copy_of(built, tmp_path / "point")
    before = _dataset_members(project)
    sims = sorted(json.loads(s["json"])["tags"]["clip_similarity"] for s in before)
    threshold = sims[len(sims) // 2]
    selected = project.build(*RECIPE, f"select.min_clip_similarity={threshold!r}", "--stage", "select")
    assert selected.ran == ["select"], selected.ran
    assert _dataset_members(project) == before  # nothing materialised
    point = list(laionbuild.read(project.path))
    assert [s["__key__"] for s in point] == dataset_keys(project) and 0 < len(point) < len(before)
    assert all(json.loads(s["json"])["tags"]["clip_similarity"] >= threshold - 1e-6 for s in point)
    decoded = list(wds.DataPipeline(lambda: laionbuild.read(project.path), wds.decode("pil"),
                                    wds.to_tuple("__key__", "jpg", "txt")))
    assert [k for k, _, _ in decoded] == [s["__key__"] for s in point] and decoded[0][1].size[0] > 0

    project.build(*RECIPE, f"select.min_clip_similarity={threshold!r}")
    assert _dataset_members(project) == point


def test_read_refuses_a_build_without_a_selection(tmp_path):
    import laionbuild
    from laionbuild.recipe.errors import InputError

    from .conftest import FAST, new_project

    project = new_project(tmp_path / "empty")
    project.laionbuild("compose", *FAST)
    with pytest.raises(InputError, match="build up to the selection first"):
        laionbuild.read(project.path)
