"""`laionbuild projector`: several builds (DVC experiments of one project and its workspace) in
one TensorBoard projector dataset, read back with the format's own rules: tensors.tsv is N rows
of D tab-separated floats without a header; metadata.tsv has a header row, then N rows;
the sprite is a ceil(sqrt N)-square grid of single_image_dim cells in row order (at most 8192
px); projector_config.pbtxt points at the three files."""

from __future__ import annotations

import json
import math
import re
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from laionbuild.shards.thumbs import thumbnail

from .shared_demo import OVERRIDES, copy_of, shared_demo

LOOSE, STRICT = 0.0, 0.1


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    """A copy of the shared demo, committed, with two DVC experiments (two select thresholds)."""
    project = copy_of(shared_demo(tmp_path_factory)[0], tmp_path_factory.mktemp("projector") / "project")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "demo build")
    points = [o for o in OVERRIDES if not o.startswith("select.")]
    result = project.laionbuild("build", "-m", *points, f"select.min_clip_similarity={LOOSE},{STRICT}")
    assert result.ran.count("select") == 2 and "download@0" not in result.ran
    return project


def read_pbtxt(text: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for name, value in re.findall(r"(\w+):\s*(\"[^\"]*\"|\d+)", text):
        fields.setdefault(name, []).append(value.strip('"'))
    return fields


def test_two_experiments_and_the_workspace_in_one_projector(experiments, tmp_path):
    project = experiments
    out = tmp_path / "projector"
    result = project.laionbuild("projector", f"loose=.@min_clip_similarity={LOOSE}",
                                f"strict=.@min_clip_similarity={STRICT}", "workspace=.", "--out", str(out))
    tags = pd.concat([pd.read_parquet(project / f"data/tags/part_{p}/tags.parquet") for p in (0, 1)],
                     ignore_index=True)
    loose = tags[tags["clip_similarity"] >= LOOSE]["key"].tolist()  # build order
    strict = tags[tags["clip_similarity"] >= STRICT]["key"].tolist()
    assert 0 < len(strict) < len(loose)
    n = len(loose) + 2 * len(strict)  # the workspace holds the last experiment's build
    assert f"{n} points x 32 (loose: {len(loose)}, strict: {len(strict)}, workspace: {len(strict)})" in result.output

    config = read_pbtxt((out / "projector_config.pbtxt").read_text())
    assert config["tensor_path"] == ["tensors.tsv"] and config["metadata_path"] == ["metadata.tsv"]
    assert config["image_path"] == ["sprite.png"] and config["single_image_dim"] == ["64", "64"]
    assert all((out / config[k][0]).is_file() for k in ("tensor_path", "metadata_path", "image_path"))

    rows = (out / "tensors.tsv").read_text().splitlines()
    tensors = np.array([[float(x) for x in row.split("\t")] for row in rows])  # no header: all numbers
    assert tensors.shape == (n, 32)

    lines = (out / "metadata.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["build", "caption", "url", "key"] and len(lines) == n + 1
    meta = [line.split("\t") for line in lines[1:]]
    assert all(len(fields) == 4 for fields in meta)
    assert [m[0] for m in meta] == ["loose"] * len(loose) + ["strict"] * len(strict) + ["workspace"] * len(strict)
    assert [m[3] for m in meta] == loose + strict + strict

    # each row is that sample's embedding in its build: the experiments' data/embeddings, read
    # from DVC's cache, hold the same per-part embeddings
    part_emb = {}
    for p in (0, 1):
        keys = pd.read_parquet(project / f"data/embed/part_{p}/metadata/metadata_0.parquet")["laionbuild_key"]
        part_emb.update(zip(keys, np.load(project / f"data/embed/part_{p}/img_emb/img_emb_0.npy").astype(np.float32)))
    np.testing.assert_allclose(tensors, np.stack([part_emb[m[3]] for m in meta]), rtol=1e-5, atol=1e-6)

    side = math.ceil(math.sqrt(n))
    sprite = Image.open(out / "sprite.png")
    assert sprite.size == (side * 64, side * 64) and max(sprite.size) <= 8192
    images = {}  # every downloaded picture by key, from img2dataset's shards (the loose build's too)
    for shard in (project / "data/images").glob("part_*/*.tar"):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            for name in names:
                if name.endswith(".json") and name[:-5] + ".jpg" in names:
                    key = json.loads(tar.extractfile(name).read())["laionbuild_key"]
                    images[key] = tar.extractfile(name[:-5] + ".jpg").read()
    for i in (0, len(loose) - 1, len(loose), n - 1):  # row order: row i is cell (i // side, i % side)
        cell = sprite.crop(((i % side) * 64, (i // side) * 64, (i % side + 1) * 64, (i // side + 1) * 64))
        assert np.array_equal(np.asarray(cell), np.asarray(thumbnail(images[meta[i][3]], 64, square=True)))
    empty = sprite.crop(((n % side) * 64, (n // side) * 64, (n % side + 1) * 64, (n // side + 1) * 64))
    assert n == side * side or np.asarray(empty).min() == 255  # cells after the last row stay blank


def test_projector_errors_name_the_build(experiments, tmp_path):
    out = str(tmp_path / "p")
    same = experiments.laionbuild("projector", "a=.", "a=.", "--out", out, check=False)
    assert same.returncode == 2 and "builds share a label" in same.output
    rev = experiments.laionbuild("projector", ".@no-such-experiment", "--out", out, check=False)
    assert rev.returncode == 2 and "`no-such-experiment` is neither a git revision nor a DVC experiment" in rev.output
    missing = experiments.laionbuild("projector", str(tmp_path), "--out", out, check=False)
    assert missing.returncode == 2 and "no data/embeddings" in missing.output
    small = experiments.laionbuild("projector", ".", "--out", out, "--sprite-size", "32", "--max-per-build", "5")
    assert "5 points x 32" in small.output and Image.open(tmp_path / "p/sprite.png").size == (96, 96)
