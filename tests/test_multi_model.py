"""recipe=laion5b_en: every part embedded by two models (the recipe's ViT-B/32 for the CLIP
similarity filter, ViT-L/14 for the score heads and the index); each tag, rule and the index use
the model they name. Here both are the tiny test architecture with different seeds, so a tag
computed from the wrong model would differ."""

from __future__ import annotations

import json
import tarfile

import faiss
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from laionbuild.stages.tag import cosine

from .test_build import _json_tail


def _load(root, rel):
    return np.load(root / rel).astype(np.float32)


def _normalised(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built5b(tmp_path_factory):
    from .conftest import new_project

    tmp = tmp_path_factory.mktemp("laion5b")
    project = new_project(tmp / "project")
    torch.manual_seed(3)
    head = nn.Linear(32, 1)  # a linear head over the (32-d) "ViT-L/14" stand-in
    torch.save(head.state_dict(), tmp / "aesthetic.pth")
    project.build("recipe=laion5b_en", "source=demo", "subset=demo_all", "subset.parts=[0]", "download=demo",
                  "embed.pretrained=random", "embed.extra_models.vit_l_14.model=laionbuild-tiny",
                  "embed.extra_models.vit_l_14.pretrained=random", "embed.extra_models.vit_l_14.seed=1",
                  f"tag.heads.aesthetic_score.path={tmp / 'aesthetic.pth'}",
                  f"tag.heads.nsfw_score.path={tmp / 'absent_nsfw.pth'}",
                  f"tag.watermark.weights={tmp / 'absent_watermark.pt'}",
                  "select.min_clip_similarity=-0.05", "index.index_key=Flat")
    project.head = head
    return project


def test_each_tag_uses_the_model_it_names(built5b):
    root = built5b.path
    part = root / "data/embed/part_0"
    b32_img, b32_text = _load(part, "img_emb/img_emb_0.npy"), _load(part, "text_emb/text_emb_0.npy")
    l14_img = _load(part, "models/vit_l_14/img_emb/img_emb_0.npy")
    assert b32_img.shape == l14_img.shape and not np.allclose(b32_img, l14_img)  # two models, same rows
    assert json.loads((part / "models/vit_l_14/model.json").read_text())["name"] == "vit_l_14"
    tags = pd.read_parquet(root / "data/tags/part_0/tags.parquet")
    np.testing.assert_allclose(tags["clip_similarity"], cosine(b32_img, b32_text), rtol=1e-5, atol=1e-6)
    weight = built5b.head.weight.detach().numpy()[0]
    bias = float(built5b.head.bias.detach().numpy()[0])
    np.testing.assert_allclose(tags["aesthetic_score"], _normalised(l14_img) @ weight + bias, rtol=1e-4, atol=1e-5)
    # missing weights: the tag is skipped with a warning naming the file, never faked
    assert "nsfw_score" not in tags and "watermark_score" not in tags
    stats = json.loads((root / "data/tags/part_0/stats.json").read_text())
    assert any("absent_nsfw.pth" in w for w in stats["skipped_heads"])
    watermark = json.loads((root / "data/watermark/part_0/stats.json").read_text())
    assert any("absent_watermark.pt" in w for w in watermark["skipped"])


def test_index_is_over_the_model_it_names_and_query_uses_it(built5b, tmp_path):
    root = built5b.path
    l14 = _load(root, "data/embeddings/models/vit_l_14/img_emb/img_emb_000000.npy")
    b32 = _load(root, "data/embeddings/img_emb/img_emb_000000.npy")
    assert l14.shape == b32.shape
    index = faiss.read_index(str(root / "data/index/image.index"))
    assert index.ntotal == len(l14)
    _, rows = index.search(_normalised(l14[3:4]), 1)
    assert rows[0][0] == 3
    assert json.loads((root / "data/index/model.json").read_text())["name"] == "vit_l_14"
    # query --image embeds with the index's model: an image of the build finds itself
    meta = pd.concat([pd.read_parquet(p) for p in sorted((root / "data/embeddings/metadata").glob("*.parquet"))])
    key = meta["key"].iloc[0]
    with tarfile.open(sorted((root / "data/dataset").glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(key + ".") and m.name.endswith(".jpg"))
        (tmp_path / "q.jpg").write_bytes(tar.extractfile(member).read())
    found = _json_tail(built5b.laionbuild("query", "--image", str(tmp_path / "q.jpg"), "-k", "1", "--json").output)
    assert found[0]["key"] == key and found[0]["score"] > 0.99


def test_a_rule_naming_an_unknown_model_is_refused(built5b):
    result = built5b.laionbuild("compose", "recipe=laion5b_en", "index.model=vit_h_14", check=False)
    assert result.returncode != 0
    assert "index.model" in result.output and "vit_h_14" in result.output and "embed.extra_models" in result.output
