"""recipe=laion5b: LAION-5B's three splits as three builds in one DVC repository
(splits/<split>/params.yaml + the standard dvc.yaml each) and the root `union` stage. Stand-ins
of the three metadata releases (one part each, images from a real HTTP server on 127.0.0.1),
laionbuild-tiny's image tower for all three, its own text tower for laion2B-en (>= 0.28) and the
tiny sentence-transformers text encoder of tests/test_multilingual.py for laion2B-multi and
laion1B-nolang (>= 0.26). The union is checked against each split's selection computed directly
from the two models, and a change to one split's threshold reruns that split's stages and the
union only."""

from __future__ import annotations

import io
import json
import os
import random
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from .conftest import FAST, ROOT, new_project
from .standins import LAION2B_MULTI_NAME, LAION400M_NAME, LAION400M_SCHEMA, write_laion2b_multi
from .test_multilingual import TOLERANCE, _normalised, _threshold_inside, write_text_model

SPLITS = {"laion2b_en": "laion5b_en", "laion2b_multi": "laion2b_multi", "laion1b_nolang": "laion1b_nolang"}
THRESHOLD = {"laion2b_en": 0.28, "laion2b_multi": 0.26, "laion1b_nolang": 0.26}
ROWS = 24
# Seeds of laionbuild-tiny's random weights whose similarities of the stand-ins straddle each
# split's threshold (seed 0's own-tower ones lie in -0.3..0.13: 0.28 would drop every sample) and,
# for laion2B-multi, some lie between 0.26 and 0.28 (so the other split's threshold would select
# otherwise): `embed.seed=11` for every split, `laion2b_en.embed.seed=22` and
# `laion2b_multi.embed.seed=13` for those (a split's own override wins)
SEED, OWN_SEEDS = 11, {"laion2b_en": 22, "laion2b_multi": 13}
SEEDS = {"laion1b_nolang": SEED, **OWN_SEEDS}
EN_WORDS = ["a", "red", "cat", "on", "the", "beach", "photo", "of", "dog", "street", "blue", "car", "sunset"]
# what every split builds without: LAION-5B's ViT-L/14 (score heads, index) and the watermark model
COMMON = ["subset.parts=[0]", "~embed.extra_models.vit_l_14", "~tag.heads.nsfw_score", "~tag.heads.aesthetic_score",
          "tag.watermark.weights=null", "index.model=null", "index.index_key=Flat", "download.allow_private_urls=true",
          "download.image_size=64"]


def write_laion2b_en(directory, image_url: str, first_image: int, seed: int = 1) -> list[dict]:
    """One LAION-2B-en-style part (metadata_0000.parquet: url, caption, width, height, LICENSE,
    NSFW, similarity) with English captions."""
    rng = random.Random(seed)
    rows = [{"url": f"{image_url}/img/{first_image + i}.jpg",
             "caption": " ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(2, 8))),
             "width": 48, "height": 40, "LICENSE": "?",
             "NSFW": rng.choice(["UNLIKELY", "UNLIKELY", "UNLIKELY", "UNSURE", "NSFW", None]),
             "similarity": round(rng.uniform(0.25, 0.4), 4)} for i in range(ROWS)]
    (directory / "laion2B-en-metadata").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), directory / "laion2B-en-metadata" / "metadata_0000.parquet")
    return rows


def write_laion1b_nolang(directory, image_url: str, first_image: int, seed: int = 2) -> list[dict]:
    """One LAION-1B-nolang-style part (LAION-400M's columns, no LANGUAGE): multi's captions,
    other images."""
    rows = write_laion2b_multi(directory / "multi", image_url, parts=1, rows=ROWS, seed=seed)[0]
    rows = [{k: v for k, v in r.items() if k != "LANGUAGE"} | {"URL": f"{image_url}/img/{first_image + i}.jpg"}
            for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(rows, schema=LAION400M_SCHEMA), directory / LAION400M_NAME.format(part=0))
    (directory / "multi" / LAION2B_MULTI_NAME.format(part=0)).unlink()
    (directory / "multi").rmdir()
    return rows


@pytest.fixture(scope="module")
def laion5b(tmp_path_factory):
    from .imageserver import ImageServer

    tmp = tmp_path_factory.mktemp("laion5b")
    project = new_project(tmp / "project")
    project.text_model = write_text_model(tmp / "mclip-tiny")
    with ImageServer() as server:
        project.data = {
            "laion2b_en": write_laion2b_en(tmp / "laion2B-en", server.url, first_image=100),
            "laion2b_multi": write_laion2b_multi(tmp / "laion2B-multi", server.url, parts=1, rows=ROWS)[0],
            "laion1b_nolang": write_laion1b_nolang(tmp / "laion1B-nolang", server.url, first_image=200),
        }
        project.overrides = ["recipe=laion5b", *COMMON,
                             f"laion2b_en.source.base_url={tmp / 'laion2B-en'}", f"embed.seed={SEED}",
                             *(f"{split}.embed.seed={seed}" for split, seed in OWN_SEEDS.items()),
                             f"laion2b_multi.source.base_url={tmp / 'laion2B-multi'}",
                             f"laion1b_nolang.source.base_url={tmp / 'laion1B-nolang'}",
                             f"laion2b_multi.embed.text_model={project.text_model}",
                             f"laion1b_nolang.embed.text_model={project.text_model}"]
        project.first = project.build(*project.overrides)
        project.direct = {name: _direct(project, name) for name in SPLITS}
        yield project


def _stages(result) -> list[str]:
    """Stages DVC ran, less the `inputs` check every graph runs on every build."""
    return [s for s in result.ran if not s.endswith(":inputs")]


def _direct(project, split: str) -> pd.DataFrame:
    """key, language, similarity of every tagged sample of a split: its image (from the split's
    shards) embedded by laionbuild-tiny with the build's random weights, its source caption by
    the split's text encoder (laion2B-en: laionbuild-tiny's own text tower)."""
    import open_clip
    import torch
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    from laionbuild.models.clip import register_model_configs
    from laionbuild.shards.thumbs import ShardImages, add_downloaded_parts

    folder = project / f"splits/{split}"
    keys = pd.read_parquet(folder / "data/tags/part_0/tags.parquet")["key"].tolist()
    rows = [project.data[split][int(k[5:])] for k in keys]  # key = 5-digit part + 9-digit source row
    register_model_configs()
    checkpoint = folder / f"data/.work/models/laionbuild-tiny-random-seed{SEEDS[split]}.pt"
    model, _, preprocess = open_clip.create_model_and_transforms("laionbuild-tiny", pretrained=str(checkpoint))
    old = os.getcwd()
    os.chdir(folder)
    try:
        with ShardImages() as images:
            add_downloaded_parts(images, [0])
            pixels = torch.stack([preprocess(Image.open(io.BytesIO(images.read(k))).convert("RGB")) for k in keys])
    finally:
        os.chdir(old)
    captions = [r.get("TEXT", r.get("caption")) for r in rows]
    with torch.no_grad():
        img = model.eval().encode_image(pixels).numpy()
        if split == "laion2b_en":
            text = model.encode_text(open_clip.get_tokenizer("laionbuild-tiny")(captions)).numpy()
    if split != "laion2b_en":
        text = SentenceTransformer(project.text_model, device="cpu").encode(captions)
    return pd.DataFrame({"key": keys, "language": [r.get("LANGUAGE") for r in rows],
                         "similarity": np.einsum("ij,ij->i", _normalised(img), _normalised(text))})


def _union(project) -> pd.DataFrame:
    files = sorted((project / "data/union").glob("*.parquet"))
    assert [f.name for f in files] == [f"{i:02d}_{s}.parquet" for i, s in enumerate(SPLITS)]  # one a split, in order
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def test_each_split_is_its_own_recipe_with_its_own_threshold_and_text_encoder(laion5b):
    for split, recipe in SPLITS.items():
        params = yaml.safe_load((laion5b / f"splits/{split}/params.yaml").read_text())
        assert params["recipe"]["name"] == recipe and params["subset"]["parts"] == [0]
        assert params["select"]["min_clip_similarity"] == THRESHOLD[split]
        assert params["embed"]["text_model"] == (None if split == "laion2b_en" else laion5b.text_model)
        # every stage of the standard graph, run in the split's folder
        assert (laion5b / f"splits/{split}/dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()
        # `dvc repro` at the root built every stage of every split's graph (each part's too)
        lock = yaml.safe_load((laion5b / f"splits/{split}/dvc.lock").read_text())["stages"]
        graph = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
        assert set(lock) == {f"{name}@0" if "foreach" in stage else name for name, stage in graph.items()}
        model = json.loads((laion5b / f"splits/{split}/data/embed/part_0/model.json").read_text())
        assert (model.get("text_model") or {}).get("path") == params["embed"]["text_model"]
    root = yaml.safe_load((laion5b / "params.yaml").read_text())
    assert root == {"recipe": root["recipe"], "splits": SPLITS} and root["recipe"]["name"] == "laion5b"
    ran = _stages(laion5b.first)
    assert ran[-1] == "union" and {s.split("/")[1] for s in ran[:-1]} == set(SPLITS)
    status = laion5b.laionbuild("status", check=False)  # one build's status: refused at a split build's root
    assert status.returncode == 2 and "split build" in status.output


def test_the_union_is_the_three_selections_each_by_its_own_threshold(laion5b):
    union = _union(laion5b)
    assert list(union.columns) == ["split", "part", "key"]
    assert not union.duplicated(["split", "key"]).any()
    expected = []
    for split in SPLITS:
        direct = laion5b.direct[split]
        # no sample within the stored embeddings' tolerance of its threshold, and each rule keeps some, drops some
        assert not np.any(np.abs(direct["similarity"] - THRESHOLD[split]) < TOLERANCE), split
        assert 0 < (direct["similarity"] >= THRESHOLD[split]).sum() < len(direct), (split, direct["similarity"])
        kept = direct.loc[direct["similarity"] >= THRESHOLD[split], "key"].tolist()
        expected += [(split, k) for k in kept]
        own = pq.read_table(laion5b / f"splits/{split}/data/selected/selected.parquet").column("key").to_pylist()
        assert own == kept
    assert list(zip(union["split"], union["key"])) == expected
    # another split's threshold would select otherwise: each split's own one is what the union holds
    other = {0.28: 0.26, 0.26: 0.28}
    assert any((laion5b.direct[split]["similarity"] >= THRESHOLD[split]).sum()
               != (laion5b.direct[split]["similarity"] >= other[THRESHOLD[split]]).sum() for split in SPLITS)


def test_one_funnel_with_a_column_per_split_and_the_per_language_table(laion5b):
    funnel = json.loads((laion5b / "data/metrics/funnel.json").read_text())
    assert set(funnel) == {*SPLITS, "all"}
    union = _union(laion5b)
    for split in SPLITS:
        steps = json.loads((laion5b / f"splits/{split}/data/metrics/funnel_steps.json").read_text())
        assert funnel[split] == {s["step"]: s["rows"] for s in steps}
        assert funnel[split]["selected"] == (union["split"] == split).sum()
        assert funnel[split]["rows_in"] == ROWS
    assert funnel["all"]["selected"] == len(union)
    assert funnel["all"]["rows_in"] == 3 * ROWS
    languages = json.loads((laion5b / "data/metrics/languages.json").read_text())
    assert {r["split"] for r in languages} == {"laion2b_multi"}  # en and nolang have no language column
    direct = laion5b.direct["laion2b_multi"]
    direct = direct.assign(kept=direct["similarity"] >= 0.26)
    expected = {code: (len(g), int(g["kept"].sum())) for code, g in direct.groupby("language")}
    assert {r["language"]: (r["tagged"], r["selected"]) for r in languages} == expected
    card = (laion5b / "data/card.md").read_text()
    assert "| step | laion2b_en | laion2b_multi | laion1b_nolang | all |" in card
    assert f"| selected | {funnel['laion2b_en']['selected']} | {funnel['laion2b_multi']['selected']} | " \
           f"{funnel['laion1b_nolang']['selected']} | {len(union)} |" in card
    assert "| split | language | tagged | selected | share kept |" in card
    assert f"`{laion5b.text_model}` (sentence_transformers)" in card and "the image model's text tower" in card
    splits = json.loads((laion5b / "data/card.json").read_text())["splits"]
    assert [(s["split"], s["min_clip_similarity"]) for s in splits] == list(THRESHOLD.items())


def test_a_change_to_one_split_reruns_that_split_and_the_union_only(laion5b):
    assert _stages(laion5b.build(*laion5b.overrides)) == []  # up to date: nothing runs
    direct = laion5b.direct["laion1b_nolang"]
    threshold = _threshold_inside(direct["similarity"])
    # plain `dvc repro` at the root, after compose: the graph is DVC's own
    laion5b.laionbuild("compose", *FAST, *laion5b.overrides, f"laion1b_nolang.select.min_clip_similarity={threshold}")
    ran = _stages(laion5b.dvc("repro"))
    assert ran[-1] == "union" and "splits/laion1b_nolang/dvc.yaml:select" in ran
    assert all(s.startswith("splits/laion1b_nolang/dvc.yaml:") for s in ran[:-1]), ran
    assert not any(":embed" in s or ":download" in s for s in ran)
    union = _union(laion5b)
    nolang = union.loc[union["split"] == "laion1b_nolang", "key"].tolist()
    assert nolang == direct.loc[direct["similarity"] >= threshold, "key"].tolist()
    for split in ("laion2b_en", "laion2b_multi"):  # the others' selections are as they were
        d = laion5b.direct[split]
        assert union.loc[union["split"] == split, "key"].tolist() == d.loc[d["similarity"] >= THRESHOLD[split], "key"].tolist()
    card = json.loads((laion5b / "data/card.json").read_text())
    assert {s["split"]: s["min_clip_similarity"] for s in card["splits"]}["laion1b_nolang"] == threshold


def test_a_new_text_encoder_for_one_split_re_embeds_that_split_only(laion5b, tmp_path):
    import shutil

    # the same weights in another folder: a changed embed.text_model, the same embeddings
    moved = tmp_path / "mclip-tiny-moved"
    shutil.copytree(laion5b.text_model, moved)
    nolang = f"laion1b_nolang.select.min_clip_similarity={_threshold_inside(laion5b.direct['laion1b_nolang']['similarity'])}"
    laion5b.build(*laion5b.overrides, nolang)  # the state this test starts from, whatever ran before it
    before = _union(laion5b)
    result = laion5b.build(*laion5b.overrides, nolang, f"laion2b_multi.embed.text_model={moved}")
    ran = _stages(result)
    assert "splits/laion2b_multi/dvc.yaml:embed@0" in ran and ran[-1] == "union"
    assert all(s.startswith("splits/laion2b_multi/dvc.yaml:") for s in ran[:-1]), ran
    for split, path in (("laion2b_multi", str(moved)), ("laion1b_nolang", laion5b.text_model)):
        model = json.loads((laion5b / f"splits/{split}/data/embed/part_0/model.json").read_text())
        assert model["text_model"]["path"] == path
    pd.testing.assert_frame_equal(_union(laion5b), before)
    splits = {s["split"]: s for s in json.loads((laion5b / "data/card.json").read_text())["splits"]}
    assert splits["laion2b_multi"]["text_model"]["path"] == str(moved)


def test_overrides_go_to_every_split_or_to_the_one_they_name():
    from laionbuild.project.splits import split_overrides
    from laionbuild.recipe.errors import RecipeError

    common, own = split_overrides(["recipe=laion5b", "subset.parts=[0]", "~tag.heads.nsfw_score",
                                   "laion2b_multi.embed.text_model=/m", "++laion1b_nolang.select.x=1"], SPLITS)
    assert common == ["subset.parts=[0]", "~tag.heads.nsfw_score"]
    assert own == {"laion2b_en": [], "laion2b_multi": ["embed.text_model=/m"], "laion1b_nolang": ["++select.x=1"]}
    with pytest.raises(RecipeError, match="names a key under it"):
        split_overrides(["laion2b_multi=1"], SPLITS)


def test_a_split_build_is_refused_where_it_cannot_be_built(tmp_path):
    project = new_project(tmp_path / "project")
    (project / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # a built recipe of one build
    text_model = write_text_model(tmp_path / "mclip-tiny")
    given = ["recipe=laion5b", f"laion2b_multi.embed.text_model={text_model}",
             f"laion1b_nolang.embed.text_model={text_model}"]
    refused = project.laionbuild("compose", *FAST, *given, check=False)
    assert refused.returncode == 2 and "a repository of its own" in refused.output
    assert not (project / "splits").exists()
    elsewhere = project.laionbuild("compose", *FAST, *given, "--output", "other.yaml", check=False)
    assert elsewhere.returncode == 2 and "not into --output" in elsewhere.output
    (project / "dvc.lock").unlink()
    missing = project.laionbuild("compose", *FAST, "recipe=laion5b", check=False)  # multi's text encoder not given
    assert missing.returncode == 2 and "split laion2b_multi" in missing.output and "embed.text_model" in missing.output
    assert not (project / "params.yaml").exists() and not (project / "splits").exists()  # nothing written
    project.laionbuild("compose", *FAST, *given)
    assert (project / "dvc.yaml").read_text().startswith("# laionbuild split build")
    assert sorted(p.name for p in (project / "splits").iterdir()) == sorted(SPLITS)
    one = project.laionbuild("compose", *FAST, "recipe=demo", check=False)  # one build's recipe at a split root
    assert one.returncode == 2 and "is one build, and this repository is a split build" in one.output
    assert (project / "dvc.yaml").read_text().startswith("# laionbuild split build")
    assert "splits:" in (project / "params.yaml").read_text()  # the split build's, not overwritten


def test_a_split_named_like_a_section_is_refused(tmp_path):
    from laionbuild.recipe.errors import RecipeError
    from laionbuild.recipe.schema import compose_splits_recipe

    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "recipe" / "bad5b.yaml").write_text("# @package _global_\nrecipe: {name: bad5b}\n"
                                               "splits: {tag: laion5b_en, laion2b_multi: laion2b_multi}\n")
    with pytest.raises(RecipeError, match="split `tag` is named like a recipe section"):
        compose_splits_recipe(["recipe=bad5b"], conf_dir=conf)
