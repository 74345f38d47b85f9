"""prepare.language_detector=fasttext: DataComp's detector for its basic filter, with the model
file a path. The model here is trained in the test (lid.176.bin is a download), and taught to
call the pool's Spanish captions English, so a build that used langid instead would keep other
rows."""

from __future__ import annotations

import json

import fasttext
import numpy as np
import pandas as pd
import pytest
import yaml

from laionbuild.metadata.language import detect
from laionbuild.recipe.schema import RecipeError, compose

from .conftest import ROOT
from .test_datacomp import FOREIGN, WORDS, datacomp_uids, write_pool


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("fasttext")
    rng = np.random.default_rng(0)
    lines = [f"__label__en {' '.join(rng.choice(WORDS, int(rng.integers(2, 9))))}" for _ in range(200)]
    lines += [f"__label__{label} {text}" for label, text in zip(("fr", "de", "en"), FOREIGN) for _ in range(60)]
    (root / "train.txt").write_text("\n".join(rng.permutation(lines)) + "\n")
    trained = fasttext.train_supervised(str(root / "train.txt"), epoch=25, lr=0.5, minCount=1, thread=1, seed=0)
    trained.save_model(str(root / "lid.bin"))
    return str(root / "lid.bin")


def datacomp_english(model_path: str, texts) -> pd.Series:
    """baselines/apply_filter.py get_fasttext_language: predict(text with newlines as spaces, k=1)."""
    model = fasttext.load_model(model_path)
    return pd.Series([model.predict(t.replace("\n", " "), k=1)[0][0].replace("__label__", "") == "en" for t in texts])


def test_basic_filter_with_fasttext_keeps_datacomps_uids(project, tmp_path, model):
    root = tmp_path / "pool"
    rows = write_pool(root)
    english = datacomp_english(model, rows.text)
    langid = pd.Series(detect(rows.text.tolist())) == "en"
    assert (english & ~langid).any()  # the Spanish captions: English to this model only
    words, chars = rows.text.str.split().str.len(), rows.text.str.len()
    short, long = np.minimum(rows.original_width, rows.original_height), np.maximum(rows.original_width, rows.original_height)
    keep = english & (words > 2) & (chars > 5) & (short >= 200) & (long / short <= 3.0)
    assert 0 < keep.sum() < len(rows)
    project.build_in_process("recipe=datacomp_basic", f"source.base_url={root}", "subset.parts=[0,1,2]",
                             "prepare.language_detector=fasttext", f"prepare.language_model={model}", until="select")
    assert np.load(project / "data/selected/uids.npy").tobytes() == datacomp_uids(rows.uid[keep]).tobytes()
    # the model file is fingerprinted for prepare (a new model version reruns prepare and what follows)
    assert list(json.loads((project / "data/inputs/language.json").read_text())["inputs"]) == [model]
    assert "data/inputs/language.json" in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["prepare"]["do"]["deps"]


def test_fasttext_needs_its_model_and_knows_its_labels(tmp_path, model):
    base = ["recipe=datacomp_basic", f"source.base_url={tmp_path}"]
    with pytest.raises(RecipeError, match=r"prepare\.language_model.*needs a fastText model file"):
        compose([*base, "prepare.language_detector=fasttext"], conf_dir=ROOT / "conf")
    with pytest.raises(RecipeError, match=r"prepare\.language_model.*is not a local file"):
        compose([*base, "prepare.language_detector=fasttext", f"prepare.language_model={tmp_path / 'lid.176.bin'}"],
                conf_dir=ROOT / "conf")
    with pytest.raises(RecipeError, match=r"prepare\.language_model.*only by language_detector=fasttext"):
        compose([*base, f"prepare.language_model={model}"], conf_dir=ROOT / "conf")
    with pytest.raises(RecipeError, match=r"`es` is not a language code fasttext detects"):
        compose([*base, "prepare.language_detector=fasttext", f"prepare.language_model={model}",
                 "prepare.languages=[en,es]"], conf_dir=ROOT / "conf")
