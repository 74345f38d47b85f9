"""recipe=laion2b_en_emb (the SISAP LAION2B seed): LAION-2B-en metadata parts next to their
published float16 image embeddings, under the real file names; keep rows whose NSFW tag is
present and not NSFW, in part order; export emb.h5 + metadata.tsv. No images, no model."""

from __future__ import annotations

import csv
import json

import faiss
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

DIM = 768
NSFW_VALUES = ["UNLIKELY", "UNSURE", "NSFW", None]


def write_laion2b_part(root, part: int, rows: int, rng, nsfw=None) -> tuple[dict, np.ndarray]:
    """metadata_NNNN.parquet + img_emb_NNNN.npy as LAION-2B-en publishes them (row i embeds row i)."""
    columns = {
        "caption": [f"p{part} r{i}" + ("\twith a tab" if i % 5 == 0 else "") + ("\nand a newline" if i % 7 == 0 else "")
                    + (' "quoted"' if i % 11 == 0 else "") for i in range(rows)],
        "url": [f"http://img{part}.example.com/{i}.jpg" for i in range(rows)],
        "key": [f"{part:05d}{i:04d}" for i in range(rows)],  # the source's own key (kept as source_key)
        "NSFW": nsfw or [NSFW_VALUES[(i * 7 + part) % 4] for i in range(rows)],
        "similarity": rng.uniform(0.28, 0.4, rows).tolist(),
        "LICENSE": [("?" if i % 3 else "cc-by") for i in range(rows)],
        "width": rng.integers(64, 1024, rows).tolist(),
        "height": rng.integers(64, 1024, rows).tolist(),
    }
    (root / "laion2B-en-metadata").mkdir(parents=True, exist_ok=True)
    (root / "img_emb").mkdir(exist_ok=True)
    pq.write_table(pa.table(columns), root / "laion2B-en-metadata" / f"metadata_{part:04d}.parquet")
    emb = rng.standard_normal((rows, DIM)).astype(np.float16)
    emb /= np.linalg.norm(emb.astype(np.float32), axis=1, keepdims=True).astype(np.float16)
    np.save(root / "img_emb" / f"img_emb_{part:04d}.npy", emb)
    return columns, emb


@pytest.fixture
def laion2b(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "laion2B-en"
    # part 2 keeps no row at all
    parts = {p: write_laion2b_part(root, p, rows, rng, nsfw) for p, rows, nsfw in
             ((1, 40, None), (2, 3, ["NSFW", None, "NSFW"]), (3, 57, None))}
    return root, parts


def expected(parts: dict) -> tuple[np.ndarray, list[list[str]]]:
    """The masked concatenation, in part order: rows whose NSFW is present and not NSFW."""
    embs, meta = [], []
    for part in sorted(parts):
        columns, emb = parts[part]
        mask = np.array([v is not None and v != "NSFW" for v in columns["NSFW"]], bool)
        embs.append(emb[mask])
        meta += [[columns[c][i] for c in ("caption", "NSFW", "LICENSE", "url")] for i in np.flatnonzero(mask)]
    return np.concatenate(embs), meta


def test_laion2b_en_emb_exports_the_masked_concatenation(project, laion2b):
    root, parts = laion2b
    project.build("recipe=laion2b_en_emb", "subset=sisap_10m", "subset.parts=[1,2,3]", f"source.base_url={root}",
                  "assemble.samples_per_shard=30", "assemble.embeddings_per_file=25", "index.index_key=Flat")
    want_emb, want_meta = expected(parts)
    assert 0 < len(want_emb) < 97
    with h5py.File(project / "data/export/emb.h5", "r") as h5:
        emb = h5["emb"][:]
    assert emb.dtype == np.float16 and emb.shape == (len(want_emb), DIM)
    assert emb.tobytes() == want_emb.tobytes()  # bit-equal
    with open(project / "data/export/metadata.tsv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    assert rows[0] == ["caption", "NSFW", "LICENSE", "url"]
    assert rows[1:] == want_meta  # aligned, captions with tabs and newlines intact
    # the usual layout too: data/embeddings in dataset order (files of 25 rows), a metadata-only
    # dataset, and an index over the same vectors
    files = sorted((project / "data/embeddings/img_emb").glob("*.npy"), key=lambda p: int(p.stem.split("_")[-1]))
    assert [len(np.load(f)) for f in files][:-1] == [25] * (len(files) - 1)
    assert np.concatenate([np.load(f) for f in files]).tobytes() == want_emb.tobytes()
    assert not list((project / "data/dataset").glob("*.tar"))
    dataset = pq.read_table(sorted((project / "data/dataset").glob("*.parquet"))).to_pydict()
    assert dataset["url"] == [m[3] for m in want_meta]
    index = faiss.read_index(str(project / "data/index/image.index"))
    assert index.ntotal == len(want_emb)
    assert index.search(want_emb[5:6].astype(np.float32), 1)[1][0][0] == 5
    funnel = json.loads((project / "data/metrics/funnel.json").read_text())
    assert funnel["selected"] == len(want_emb) and funnel["indexed"] == len(want_emb)
    metrics = json.loads((project / "data/metrics/index.json").read_text())
    assert metrics["query_kind"] == "img" and metrics["recall_at_10"] == 1.0
    model = json.loads((project / "data/embed/part_1/model.json").read_text())
    assert model["architecture"] == "ViT-L-14/openai" and model["dtype"] == "float16"


def test_embeddings_that_do_not_match_the_metadata_are_refused(project, laion2b):
    root, parts = laion2b
    np.save(root / "img_emb" / "img_emb_0003.npy", parts[3][1][:-1])  # one row short
    result = project.build("recipe=laion2b_en_emb", "subset.parts=[3]", f"source.base_url={root}", check=False)
    assert result.returncode != 0
    assert "img_emb_0003.npy: shape (56, 768) does not match metadata_0003.parquet (57 rows)" in result.output
