"""Recipe schema: composition, validation at compose time and at stage load time."""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

from laionbuild.recipe.schema import RecipeError, compose, load_params, to_yaml

from .conftest import ROOT

CONF = ROOT / "conf"

BAD_RECIPES = [
    (["select.min_clip_similarity=1.5"], "select.min_clip_similarity"),
    (["select.min_clip_similarity=-2"], "select.min_clip_similarity"),
    (["download.image_size=-1"], "download.image_size"),
    (["download.min_image_size=-5"], "download.min_image_size"),
    (["subset.parts=[]"], "subset.parts"),
    (["subset.parts=[0,7]"], "subset.parts"),
    (["+select.min_clip_similarty=0.3"], "min_clip_similarty"),  # unknown (misspelt) key
    (["+download.resize=border"], "resize"),
    (["download.image_size=big"], "download.image_size"),  # wrong type
    (["embed.batch_size=0"], "embed.batch_size"),
    (["download.resize_mode=stretch"], "download.resize_mode"),
]


def test_default_recipe_is_the_demo():
    cfg = compose([], conf_dir=CONF)
    assert cfg.recipe.name == "demo"
    assert cfg.embed.pretrained == "random"
    assert cfg.download.resize_mode == "border"
    assert cfg.subset.parts == [0, 1, 2]


def test_overrides_use_hydra_grammar():
    cfg = compose(["subset.parts=[0,2]", "select.min_clip_similarity=0.3", "download.image_size=64"], conf_dir=CONF)
    assert cfg.subset.parts == [0, 2]
    assert cfg.select.min_clip_similarity == 0.3
    assert cfg.download.image_size == 64


@pytest.mark.parametrize("overrides,key", BAD_RECIPES)
def test_bad_recipe_is_refused_naming_the_key(overrides, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        compose(overrides, conf_dir=CONF)


def test_composed_yaml_round_trips_through_stage_loading(tmp_path):
    cfg = compose(["select.min_clip_similarity=0.25"], conf_dir=CONF)
    path = tmp_path / "params.yaml"
    path.write_text(to_yaml(cfg))
    assert load_params(path) == cfg


def test_hydra_without_our_schema_gives_the_same_params():
    """`dvc exp run -S` composes conf/ with Hydra alone: the YAML must hold every key, so its
    params.yaml equals ours."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain = OmegaConf.to_container(hydra_compose(config_name="config"))
    ours = yaml.safe_load(to_yaml(compose([], conf_dir=CONF)))
    assert plain == ours


@pytest.mark.parametrize("edit,key", [
    ({"select": {"min_clip_similarity": 3.0}}, "select.min_clip_similarity"),
    ({"download": {"image_sise": 64}}, "image_sise"),
    ({"subset": {"parts": [9]}}, "subset.parts"),
    ({"embed": {"batch_size": "many"}}, "embed.batch_size"),
])
def test_stage_loading_validates_params_yaml(tmp_path, edit, key):
    raw = yaml.safe_load(to_yaml(compose([], conf_dir=CONF)))
    for group, values in edit.items():
        raw[group].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")) as info:
        load_params(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("overrides,key", BAD_RECIPES[:6])
def test_bad_recipe_fails_before_any_stage_runs(project, overrides, key):
    result = project.laionbuild("build", *overrides, check=False)
    assert result.returncode != 0
    assert key in result.output
    assert result.ran == []
    assert not (project / "data").exists()


def test_hand_edited_params_fail_in_the_first_stage_naming_the_key(project):
    project.laionbuild("compose")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["select"]["min_clip_similarity"] = 7
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = project.dvc("repro", check=False)
    assert result.returncode != 0
    assert "select.min_clip_similarity" in result.output
    assert not list((project / "data").glob("*/part_*"))


def test_build_up_to_one_stage(project):
    result = project.build("--stage", "prepare")
    assert sorted(result.ran) == sorted([f"{s}@{p}" for s in ("fetch", "prepare") for p in (0, 1, 2)] + ["consolidate"])
    assert (project / "data/prepared/part_0/metadata.parquet").exists()
    assert not (project / "data/images").exists()
    status = project.status()
    assert status["prepare@2"] == "built" and status["download@0"] == "missing" and status["report"] == "missing"


def test_committed_params_yaml_is_the_default_recipe():
    """`dvc repro` on the committed params.yaml builds the demo: keep it equal to a fresh compose."""
    assert (ROOT / "params.yaml").read_text() == to_yaml(compose([], conf_dir=CONF))


def test_a_validated_params_yaml_is_remembered_by_its_content(project, monkeypatch):
    """Stage processes load a params.yaml validated before from a memo (no OmegaConf); any edit
    of the file is validated again."""
    import dataclasses
    import pickle

    project.laionbuild("compose")
    monkeypatch.chdir(project.path)
    cfg = load_params("params.yaml")
    memos = list((project / "data/.work/params").glob("*.pickle"))
    assert len(memos) == 1 and load_params("params.yaml") == cfg
    # the memo is what a second load returns
    marked = dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, name="from-the-memo"))
    memos[0].write_bytes(pickle.dumps(marked))
    assert load_params("params.yaml").recipe.name == "from-the-memo"
    # an edit is a new content: read and validated again
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["select"]["min_clip_similarity"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    edited = load_params("params.yaml")
    assert edited.select.min_clip_similarity == 0.5 and edited.recipe.name == cfg.recipe.name
    params["select"]["min_clip_similarity"] = 7
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(RecipeError, match="select.min_clip_similarity"):
        load_params("params.yaml")
    # a damaged memo is ignored
    params["select"]["min_clip_similarity"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for memo in (project / "data/.work/params").glob("*.pickle"):
        memo.write_bytes(b"not a pickle")
    assert load_params("params.yaml").select.min_clip_similarity == 0.5
