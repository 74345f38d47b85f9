"""source=datacomp and DataComp's filtering baselines as recipes, on a stand-in pool the test
writes as DataComp publishes one (per shard: metadata parquet + features .npz of the same stem):
the selected uids (data/selected/uids.npy, DataComp's sorted `u8,u8` format) equal what DataComp's
baselines/utils.py computes over the same files, and the embeddings are the pool's own."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laionbuild.metadata.language import detect
from laionbuild.recipe.schema import RecipeError, compose

from .conftest import ROOT

SHARDS = ["0a3f9c", "51be07", "e2d418"]  # DataComp's shards have hexadecimal names; part N is the N-th
WORDS = ["a", "photo", "of", "the", "dog", "red", "car", "on", "beach", "in", "snow", "with", "friends"]
FOREIGN = ["une photo du chien rouge sur la plage avec des amis", "ein rotes Auto im Schnee mit Freunden",
           "un coche rojo en la playa con amigos"]


def write_pool(root, rows=(40, 25, 37), seed=0) -> pd.DataFrame:
    """The pool's shards; returns all its rows (with `shard`, and the features as columns)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    frames = []
    for shard, n in zip(SHARDS, rows):
        uid = [f"{int(x):016x}{int(y):016x}" for x, y in zip(rng.integers(0, 2**63, n), rng.integers(0, 2**63, n))]
        text = [FOREIGN[i % 3] if i % 7 == 3 else " ".join(rng.choice(WORDS, int(rng.integers(1, 9)))) for i in range(n)]
        frame = pd.DataFrame({
            "uid": uid, "url": [f"http://img.example.com/{shard}/{i}.jpg" for i in range(n)], "text": text,
            "original_width": rng.choice([120, 199, 200, 256, 640, 900], n),
            "original_height": rng.choice([150, 200, 480, 700, 2000], n),
            # ties: scores on a coarse grid, as float32 as DataComp stores them
            "clip_b32_similarity_score": (rng.integers(20, 36, n) / 100).astype(np.float32),
            "clip_l14_similarity_score": (rng.integers(15, 35, n) / 100).astype(np.float32),
            "face_bboxes": [[[0.1, 0.2, 0.3, 0.4]] * int(i % 2) for i in range(n)],
            "sha256": [f"{i:064x}" for i in range(n)],
        })
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), root / f"{shard}.parquet")
        features = {name: rng.standard_normal((n, dim)).astype(np.float16)
                    for name, dim in (("b32_img", 512), ("b32_txt", 512), ("l14_img", 768), ("l14_txt", 768))}
        np.savez(root / f"{shard}.npz", **features)
        frames.append(frame.assign(shard=shard, l14_img=list(features["l14_img"])))
    return pd.concat(frames, ignore_index=True)


def datacomp_uids(uids) -> np.ndarray:
    """baselines/utils.py: (int(uid[:16], 16), int(uid[16:32], 16)) as `u8,u8`, sorted (save_uids)."""
    out = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    out.sort()
    return out


def clip_score_fraction(pool: pd.DataFrame, key: str, fraction: float) -> pd.Series:
    """baselines/utils.py get_threshold, then `df[key] >= threshold`."""
    threshold = -np.sort(-pool[key].values)[int(len(pool) * fraction)]
    return pool[key] >= threshold


@pytest.fixture
def pool(tmp_path):
    return tmp_path / "datacomp_small" / "metadata", write_pool(tmp_path / "datacomp_small" / "metadata")


def test_clip_score_recipe_selects_datacomps_top_30_percent_uids(project, pool):
    root, rows = pool
    project.build("recipe=datacomp_clip_score", f"source.base_url={root}", "subset.parts=[0,1,2]",
                  "index.index_key=Flat")
    keep = clip_score_fraction(rows, "clip_l14_similarity_score", 0.3)
    assert 0.3 * len(rows) < keep.sum() < len(rows)  # ties at the threshold are kept
    uids = np.load(project / "data/selected/uids.npy")
    assert uids.dtype == np.dtype([("f0", "<u8"), ("f1", "<u8")]) and uids.ndim == 1
    assert uids.tobytes() == datacomp_uids(rows.uid[keep]).tobytes()
    # the pool's own L/14 image features, in build order (shard order, then row order)
    files = sorted((project / "data/embeddings/img_emb").glob("*.npy"))
    emb = np.concatenate([np.load(f) for f in files])
    assert emb.dtype == np.float16 and emb.tobytes() == np.stack(rows.l14_img[keep].tolist()).tobytes()
    tags = pq.read_table(project / "data/tags/part_1/tags.parquet")
    assert {"uid", "clip_l14_similarity_score", "clip_b32_similarity_score"} <= set(tags.column_names)
    funnel = json.loads((project / "data/metrics/funnel.json").read_text())
    assert funnel["rows_in"] == len(rows) and funnel["selected"] == keep.sum() == funnel["after_top_clip_l14_similarity_score"]
    model = json.loads((project / "data/embed/part_2/model.json").read_text())
    assert model["architecture"] == "ViT-L-14/openai" and model["array"] == "l14_img"
    assert model["from_source"].endswith(f"{SHARDS[2]}.npz")


def test_laion2b_and_basic_recipes_select_datacomps_uids(project, pool):
    """The LAION-2B baseline (English, B/32 >= 0.28) and the basic one (English, more than 2
    words and 5 characters, shorter side >= 200, aspect ratio <= 3), with laionbuild's language
    detector in place of DataComp's (gcld3 / fasttext)."""
    root, rows = pool
    english = pd.Series(detect(rows.text.tolist())) == "en"
    assert 0 < (~english).sum()
    laion = english & (rows.clip_b32_similarity_score >= np.float32(0.28))
    words, chars = rows.text.str.split().str.len(), rows.text.str.len()
    short, long = np.minimum(rows.original_width, rows.original_height), np.maximum(rows.original_width, rows.original_height)
    basic = english & (words > 2) & (chars > 5) & (short >= 200) & (long / short <= 3.0)
    for recipe, keep in (("datacomp_laion2b", laion), ("datacomp_basic", basic)):
        assert 0 < keep.sum() < len(rows)
        project.build_in_process(f"recipe={recipe}", f"source.base_url={root}", "subset.parts=[0,1,2]",
                                 until="select")
        uids = np.load(project / "data/selected/uids.npy")
        assert uids.tobytes() == datacomp_uids(rows.uid[keep]).tobytes(), recipe


def test_text_based_baseline_keeps_english_captions_naming_a_listed_word(project, pool, tmp_path):
    """English and a word of the list (DataComp: an ImageNet-21k synset), through the report."""
    root, rows = pool
    words = tmp_path / "synsets.txt"
    words.write_text("red car\nbeach\n")
    english = pd.Series(detect(rows.text.tolist())) == "en"
    named = rows.text.str.contains(r"\bred car\b|\bbeach\b", case=False, regex=True)
    keep = english & named
    assert 0 < keep.sum() < named.sum()
    project.build_in_process("recipe=datacomp_laion2b", "~select.min_scores.clip_b32_similarity_score",
                             f"prepare.caption_word_list={words}", f"source.base_url={root}", "subset.parts=[0,1,2]",
                             "index.index_key=Flat", until="report")
    assert np.load(project / "data/selected/uids.npy").tobytes() == datacomp_uids(rows.uid[keep]).tobytes()
    funnel = json.loads((project / "data/metrics/funnel.json").read_text())
    assert funnel["after_caption_words"] == funnel["selected"] == keep.sum()
    assert "caption_words" in (project / "data/report/index.html").read_text()


def test_an_npz_needs_its_array_named(tmp_path, pool):
    root, _ = pool
    with pytest.raises(RecipeError, match=r"embed\.from_source_array.*l14_img"):
        compose(["recipe=datacomp_clip_score", f"source.base_url={root}", "embed.from_source_array=null"],
                conf_dir=ROOT / "conf")
    with pytest.raises(RecipeError, match=r"source\.image_embeddings.*\{stem\}"):
        compose(["recipe=datacomp_clip_score", f"source.base_url={root}", "source.image_embeddings='{shard}.npz'"],
                conf_dir=ROOT / "conf")


def test_an_array_the_npz_lacks_is_named_with_the_ones_it_has(project, pool):
    root, _ = pool
    result = project.build("recipe=datacomp_clip_score", f"source.base_url={root}", "subset.parts=[0]",
                           "embed.from_source_array=h14_img", "--stage", "embed", check=False)
    assert result.returncode != 0
    assert (f"{SHARDS[0]}.npz: no array `h14_img` (embed.from_source_array); it has b32_img, b32_txt, l14_img, l14_txt"
            in result.output)


def test_caption_words_are_counted_as_str_split_counts_them():
    """DataComp's basic filter counts words with str.split(): tabs, newlines, NBSP and Unicode
    separators split words, and leading/trailing ones add none."""
    import duckdb

    from laionbuild.engine.sql import DUCKDB

    captions = ["dog cat\n", "\tdog cat", "dog\xa0cat x", "", "   ", "one", "a  b   c", "x\u3000y\u2028z", "a\x1cb",
                None, "é ü", "line\r\nbreak"]
    for caption in captions:
        counted = duckdb.execute(f"SELECT {DUCKDB.words('c')} FROM (SELECT ?::VARCHAR AS c)", [caption]).fetchone()[0]
        assert counted == (len(caption.split()) if caption is not None else 0), repr(caption)
