"""Tags from embeddings, computed once and selected cheaply: score heads (weights the test
writes) and the near-duplicate tag (checked against brute force), each as a select rule whose
change reruns only select and what follows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import torch

from .shared_demo import RECIPE, copy_of, shared_demo

GLOBAL = ["select", "assemble", "export", "index", "report", "card"]


def embeddings(project, parts):
    keys, emb = [], []
    for p in parts:
        keys += pq.read_table(project / f"data/embed/part_{p}/metadata/metadata_0.parquet")["laionbuild_key"].to_pylist()
        emb.append(np.load(project / f"data/embed/part_{p}/img_emb/img_emb_0.npy").astype(np.float32))
    emb = np.concatenate(emb)
    return [str(k) for k in keys], emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_score_heads_and_near_duplicates_are_tags_and_rules(tmp_path, tmp_path_factory):
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1)  # laionbuild-tiny's embed_dim
    torch.save(head.state_dict(), tmp_path / "aesthetic.pth")
    # the session's demo build with new tag params: only the tags and what follows them run
    project = copy_of(shared_demo(tmp_path_factory)[0], tmp_path / "project")
    base = [*RECIPE, "tag.near_dup.enabled=true",
            f"+tag.heads.aesthetic_score={{kind:linear,path:{tmp_path / 'aesthetic.pth'}}}",
            f"+tag.heads.watermark_score={{kind:mlp,path:{tmp_path / 'missing.pth'}}}"]
    tagged = project.build(*base)
    assert sorted(tagged.ran) == sorted(["tag@0", "tag@1", "neardup", *GLOBAL])

    keys, emb = embeddings(project, [0, 1])
    tags = {r["key"]: r for p in (0, 1) for r in pq.read_table(project / f"data/tags/part_{p}/tags.parquet").to_pylist()}
    want = emb @ head.weight.detach().numpy()[0] + head.bias.item()
    got = np.array([tags[k]["aesthetic_score"] for k in keys])
    assert np.allclose(got, want, atol=1e-5)
    assert all("watermark_score" not in t for t in tags.values())  # missing weights: skipped, not faked
    stats = json.loads((project / "data/tags/part_0/stats.json").read_text())
    assert any("missing.pth" in w and "watermark_score" in w for w in stats["skipped_heads"])

    near = pq.read_table(project / "data/neardup/neardup.parquet").to_pylist()
    assert [r["key"] for r in near] == keys  # build order
    sims = emb @ emb.T
    for i, row in enumerate(near):
        if i == 0:
            assert row["near_dup_similarity"] == -1.0 and row["near_dup_of"] is None
            continue
        j = int(np.argmax(sims[i, :i]))
        assert abs(row["near_dup_similarity"] - sims[i, j]) < 1e-4
        assert row["near_dup_of"] == keys[j] or abs(sims[i, keys.index(row["near_dup_of"])] - sims[i, j]) < 1e-4

    # both rules are cheap: only select and what follows rerun
    threshold = float(np.median([r["near_dup_similarity"] for r in near]))
    score_min = float(np.median(want))
    result = project.build(*base, f"select.max_near_dup_similarity={threshold!r}",
                           f"+select.min_scores={{aesthetic_score:{score_min!r}}}", "select.min_clip_similarity=null")
    assert result.ran == GLOBAL
    kept = set(pq.read_table(project / "data/selected/selected.parquet")["key"].to_pylist())
    expected = {k for k, r in zip(keys, near) if r["near_dup_similarity"] < threshold and tags[k]["aesthetic_score"] >= score_min}
    assert kept == expected and 0 < len(kept) < len(keys)
    funnel = json.loads((project / "data/metrics/funnel.json").read_text())
    assert funnel["selected"] == len(kept) == funnel["after_max_near_dup_similarity"]
    assert funnel["after_min_aesthetic_score"] == sum(tags[k]["aesthetic_score"] >= score_min for k in keys)
