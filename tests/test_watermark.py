"""The pixel watermark tag (tag.watermark, the watermark stage): LAION-5B-WatermarkDetection's
checkpoint layout loads (the real efficientnet_b3a + head state dict, built here with random
weights), a build against the loopback image server scores every downloaded sample exactly as
LAION's own recipe (timm model + torchvision transform + softmax) scores the same images,
`select.max_scores.watermark_score` keeps exactly what that computation keeps, and a rule on the
score without the checkpoint is refused at compose."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from laionbuild.recipe.errors import InputError, RecipeError
from laionbuild.recipe.schema import compose

from .conftest import ROOT
from .imageserver import ImageServer, make_image, source_overrides, write_source

# LAION's inference.py / example_use.py, spelled out here independently of laionbuild's loader
LAION_TRANSFORM = T.Compose([T.Resize((256, 256)), T.ToTensor(),
                             T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


def laion_model(architecture: str, hidden: tuple[int, int], in_features: int) -> nn.Module:
    """timm.create_model(architecture, num_classes=2) with LAION's classifier head, random weights."""
    model = timm.create_model(architecture, pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(
        nn.Linear(in_features=in_features, out_features=hidden[0]), nn.ReLU(), nn.Dropout(p=0.3),
        nn.Linear(in_features=hidden[0], out_features=hidden[1]), nn.ReLU(),
        nn.Linear(in_features=hidden[1], out_features=2))
    return model.eval()


def p_watermark(model: nn.Module, images: list[Image.Image]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.stack([LAION_TRANSFORM(image.convert("RGB")) for image in images]))
        return torch.softmax(logits, dim=1)[:, 0].numpy()


def test_the_loader_takes_laions_efficientnet_b3a_checkpoint_and_scores_like_laion(tmp_path):
    from laionbuild.models.watermark import WatermarkScorer, load_model

    torch.manual_seed(0)
    model = laion_model("efficientnet_b3", (625, 256), 1536)  # timm 1.0's name for LAION's efficientnet_b3a
    path = tmp_path / "watermark_model_v1.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path)  # the defaults: LAION's architecture name and head sizes
    theirs, ours = model.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert {k: tuple(v.shape) for k, v in ours.items() if k.startswith("classifier.")} == {
        "classifier.0.weight": (625, 1536), "classifier.0.bias": (625,), "classifier.3.weight": (256, 625),
        "classifier.3.bias": (256,), "classifier.5.weight": (2, 256), "classifier.5.bias": (2,)}
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (200 + 40 * i, 300, 3), np.uint8))
              for i in range(2)]
    scores = WatermarkScorer(path, device="cpu").score(images)
    np.testing.assert_allclose(scores, p_watermark(model, images), rtol=1e-5, atol=1e-6)

    # a wrapped or DDP-prefixed save of the same weights loads the same
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.items()}}, tmp_path / "wrapped.pt")
    assert all(torch.equal(v, theirs[k]) for k, v in load_model(tmp_path / "wrapped.pt").state_dict().items())
    # another head does not fit: refused naming the file, the keys and the shapes, never half-loaded
    with pytest.raises(InputError, match=r"watermark_model_v1\.pt.*classifier\.3\.weight \(256, 625\)"):
        load_model(path, head=[625, 128])
    with pytest.raises(InputError, match=r"watermark_model_v1\.pt.*missing 2 keys: classifier\.7\.bias, classifier\.7\.weight"):
        load_model(path, head=[625, 256, 64])
    torch.save(model, tmp_path / "pickled_model.pt")  # a whole pickled model, not a state dict
    with pytest.raises(InputError, match=r"pickled_model\.pt: not a torch state dict"):
        load_model(tmp_path / "pickled_model.pt")


def spread_scores(model: nn.Module, images: list[Image.Image]) -> None:
    """Random weights score every image about the same: rescale the last layer so the logit
    difference of these images is centred on 0 with a spread of about 2 (scores ~0.1..0.9)."""
    with torch.no_grad():
        logits = model(torch.stack([LAION_TRANSFORM(image.convert("RGB")) for image in images]))
        diff = logits[:, 0] - logits[:, 1]
        scale = 2.0 / float(diff.std())
        last = model.classifier[5]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
        last.bias.add_(torch.tensor([-0.5, 0.5]) * scale * float(diff.mean()))


def shard_images(project) -> dict[str, Image.Image]:
    """key -> the decoded image of every sample in the download's shards."""
    images = {}
    for shard in sorted((project / "data/images/part_0").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if name.endswith(".json"):
                    key = json.loads(tar.extractfile(member).read())["laionbuild_key"]
                    data = tar.extractfile(members[name.removesuffix(".json") + ".jpg"]).read()
                    images[key] = Image.open(io.BytesIO(data))
    return images


def test_the_watermark_tag_scores_every_downloaded_sample_and_select_keeps_what_laions_scores_keep(project, tmp_path):
    torch.manual_seed(1)
    model = laion_model("test_efficientnet", (16, 8), 256)  # a tiny timm EfficientNet, LAION's head layout
    spread_scores(model, [Image.open(io.BytesIO(make_image(i))) for i in range(14)])
    weights = tmp_path / "watermark_tiny.pt"
    torch.save(model.state_dict(), weights)
    source = tmp_path / "source"
    common = [*source_overrides(source), "download.allow_private_urls=true", "download.number_sample_per_shard=4",
              f"tag.watermark.weights={weights}", "tag.watermark.architecture=test_efficientnet",
              "tag.watermark.head=[16,8]", "tag.watermark.batch_size=3", "select.min_clip_similarity=null"]
    with ImageServer() as server:
        write_source(source, server.url, rows=14, missing_every=5)  # rows 0, 5, 10: 404
        project.build(*common, "--stage", "select")
    downloaded = set()
    for path in (project / "data/images/part_0").glob("*.parquet"):
        t = pq.read_table(path, columns=["status", "laionbuild_key"]).to_pydict()
        downloaded |= {k for k, s in zip(t["laionbuild_key"], t["status"]) if s == "success"}
    assert len(downloaded) == 14 - 3 and len(list((project / "data/images/part_0").glob("*.tar"))) > 1
    scored = pq.read_table(project / "data/watermark/part_0/watermark.parquet")
    assert scored.column("key").to_pylist() == sorted(downloaded)  # every downloaded sample, in key order
    stats = json.loads((project / "data/watermark/part_0/stats.json").read_text())
    assert stats["counts"] == {"watermark_tagged": len(downloaded)} and stats["skipped"] == []

    # the same model on the same decoded images, as LAION's inference.py runs it
    images = shard_images(project)
    keys = sorted(images)
    assert keys == sorted(downloaded)
    want = p_watermark(model, [images[k] for k in keys])
    tags = {r["key"]: r for r in pq.read_table(project / "data/tags/part_0/tags.parquet").to_pylist()}
    assert sorted(tags) == keys
    got = np.array([tags[k]["watermark_score"] for k in keys])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert want.max() - want.min() > 0.1  # scores that can tell the rule's two sides apart

    # the rule: halfway between two neighbouring scores, so no score sits on the threshold
    ordered = np.sort(want)
    threshold = float((ordered[4] + ordered[5]) / 2)
    kept = project.build(*common, f"+select.max_scores={{watermark_score:{threshold!r}}}", "--stage", "select")
    assert kept.ran == ["select"]  # a threshold reruns the query only: no image is scored again
    selected = pq.read_table(project / "data/selected/selected.parquet").column("key").to_pylist()
    assert selected == [k for k, p in zip(keys, want) if p <= threshold] and len(selected) == 5
    counts = json.loads((project / "data/selected/stats.json").read_text())["counts"]
    assert counts["after_max_watermark_score"] == counts["selected"] == 5

    # the checkpoint is a dependency: new weights in the same file rescore the part and rerun the
    # tags and the rule, never the download, the face tags or the embeddings
    torch.manual_seed(2)
    retrained = laion_model("test_efficientnet", (16, 8), 256)
    spread_scores(retrained, [Image.open(io.BytesIO(make_image(i))) for i in range(14)])
    torch.save(retrained.state_dict(), weights)
    rescored = project.build(*common, f"+select.max_scores={{watermark_score:{threshold!r}}}", "--stage", "select")
    assert sorted(rescored.ran) == ["select", "tag@0", "watermark@0"]
    now = pq.read_table(project / "data/watermark/part_0/watermark.parquet").column("watermark_score").to_numpy()
    np.testing.assert_allclose(now, p_watermark(retrained, [images[k] for k in keys]), rtol=1e-5, atol=1e-6)

    # resumed per shard: a run that fails on the last shard keeps the shards it finished, and the
    # next run scores only the rest (that shard's image zeroed in place, size and mtime kept, so
    # the stage's work fingerprint stays the same; then restored the same way)
    output = project / "data/watermark/part_0/watermark.parquet"
    reference = pq.read_table(output)
    last = sorted((project / "data/images/part_0").glob("*.tar"))[-1]
    original, stat = last.read_bytes(), last.stat()
    with tarfile.open(last) as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    with open(last, "r+b") as f:
        f.seek(jpg.offset_data)
        f.write(bytes(jpg.size))
    os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    output.unlink()
    failed = project.laionbuild("stage", "watermark", "--part", "0", check=False)
    assert failed.returncode == 2 and "cannot be decoded" in failed.output
    assert f"data/images/part_0/{last.name}: sample" in failed.output
    assert not output.exists()
    [work] = (project / "data/.work/watermark").iterdir()
    finished = sorted(work.iterdir())
    assert [p.name for p in finished] == [f"{t.stem}.parquet" for t in
                                          sorted((project / "data/images/part_0").glob("*.tar"))[:-1]]
    # mark one finished shard's scores: a resumed run takes them as they are, a fresh one would rescore
    first = pq.read_table(finished[0])
    marked = first.set_column(1, "watermark_score", pa.array([-1.0] * first.num_rows, pa.float32()))
    pq.write_table(marked, finished[0])
    last.write_bytes(original)
    os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    project.laionbuild("stage", "watermark", "--part", "0")
    resumed = pq.read_table(output)
    assert resumed.column("key").equals(reference.column("key"))
    marked_keys = set(first.column("key").to_pylist())
    for key, got, was in zip(resumed.column("key").to_pylist(), resumed.column("watermark_score").to_pylist(),
                             reference.column("watermark_score").to_pylist()):
        assert got == (-1.0 if key in marked_keys else was)
    assert not work.exists()  # scratch removed once the part is in place


def test_a_rule_on_the_watermark_score_without_the_checkpoint_is_refused_at_compose(project, tmp_path):
    rule = "+select.max_scores={watermark_score:0.8}"
    with pytest.raises(RecipeError, match=r"select\.max_scores\.watermark_score.*tag\.watermark\.weights=PATH"):
        compose([rule], conf_dir=ROOT / "conf")
    absent = tmp_path / "models" / "watermark_model_v1.pt"
    with pytest.raises(RecipeError, match=rf"select\.max_scores\.watermark_score.*{absent}.*does not exist"):
        compose([rule, f"tag.watermark.weights={absent}"], conf_dir=ROOT / "conf")
    # through the CLI: refused before any stage runs, the key and the fix named
    for command in ("compose", "build"):
        refused = project.laionbuild(command, rule, check=False)
        assert refused.returncode == 2 and "select.max_scores.watermark_score" in refused.output
        assert "tag.watermark.weights" in refused.output
    assert not (project / "data/tags").exists()
    # the checkpoint given: the same rule composes
    absent.parent.mkdir()
    torch.save(laion_model("test_efficientnet", (16, 8), 256).state_dict(), absent)
    cfg = compose([rule, f"tag.watermark.weights={absent}"], conf_dir=ROOT / "conf")
    assert cfg.select.max_scores == {"watermark_score": 0.8}
    # a score head of the same name, or no images to score: refused too
    head = f"+tag.heads.watermark_score={{kind:mlp,path:{tmp_path / 'wm.npz'}}}"
    with pytest.raises(RecipeError, match=r"tag\.heads\.watermark_score"):
        compose([head, f"tag.watermark.weights={absent}"], conf_dir=ROOT / "conf")
    with pytest.raises(RecipeError, match=r"download\.enabled.*tag\.watermark\.weights=null"):
        compose(["recipe=laion2b_en_emb", f"tag.watermark.weights={absent}"], conf_dir=ROOT / "conf")
