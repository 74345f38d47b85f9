"""recipe=laion2b_multi: captions embedded by a text encoder that is not the image model's
(`embed.text_model`), paired with embed.model's image tower. The text encoder is a tiny BERT-style
sentence-transformers model the test writes (its own WordPiece vocabulary over the stand-in's
five scripts, random weights, a Dense projection to laionbuild-tiny's 32 dimensions); the
stand-in's images come from a real HTTP server on 127.0.0.1. Similarities and selections are
checked against a direct computation with the same two models."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from laionbuild.recipe.errors import LaionbuildError
from laionbuild.recipe.schema import compose

from .conftest import FAST, ROOT, build_env, new_project
from .standins import MULTI_WORDS

WIDTH = 32  # laionbuild-tiny's embed_dim


def write_text_model(path, width: int = WIDTH, seed: int = 0) -> str:
    """A sentence-transformers model folder: BERT (1 layer, 24 wide, random weights) with a
    vocabulary of the stand-in's characters, mean pooling, a Dense projection to `width`."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    chars = sorted({ch for words in MULTI_WORDS.values() for w in words for ch in w.lower()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{ch}" for ch in chars)]
    bert = path.parent / f"{path.name}-bert"
    bert.mkdir(parents=True)
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # accents kept (BERT's lowercasing strips them by default: é -> e, で -> て)
    tokenizer = BertTokenizerFast(vocab_file=str(bert / "vocab.txt"), do_lower_case=True, strip_accents=False)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    word = models.Transformer(str(bert), max_seq_length=64)
    pool = models.Pooling(word.get_word_embedding_dimension(), "mean")
    dense = models.Dense(pool.get_sentence_embedding_dimension(), width, activation_function=torch.nn.Identity())
    SentenceTransformer(modules=[word, pool, dense], device="cpu").save(str(path))
    return str(path)


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# LAION-5B's ViT-L/14 (score heads, index) left out: the pair under test is embed.model + embed.text_model
BUILD = ["recipe=laion2b_multi", "subset.parts=[0,1]", "~embed.extra_models.vit_l_14", "~tag.heads.nsfw_score",
         "tag.watermark.weights=null", "~tag.heads.aesthetic_score", "index.model=null", "index.index_key=Flat",
         "download.allow_private_urls=true", "download.image_size=64"]


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    from .imageserver import ImageServer
    from .standins import write_laion2b_multi

    tmp = tmp_path_factory.mktemp("multi")
    project = new_project(tmp / "project")
    project.text_model = write_text_model(tmp / "mclip-tiny")
    project.source = tmp / "laion2B-multi"
    with ImageServer() as server:
        project.data = write_laion2b_multi(project.source, server.url, parts=2, rows=30)
        project.overrides = [*BUILD, f"source.base_url={project.source}", f"embed.text_model={project.text_model}"]
        project.build_in_process(*project.overrides)
    return project


def _tagged(project) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(project / f"data/tags/part_{p}/tags.parquet") for p in (0, 1)],
                     ignore_index=True)


def _direct(project) -> pd.DataFrame:
    """key, language, similarity: each tagged sample's image (from the shards) embedded by
    laionbuild-tiny with the build's random weights, its source caption by the text model."""
    import open_clip
    import torch
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    from laionbuild.models.clip import register_model_configs
    from laionbuild.shards.thumbs import ShardImages, add_downloaded_parts

    keys = _tagged(project)["key"].tolist()
    rows = [project.data[int(k[:5])][int(k[5:])] for k in keys]  # key = 5-digit part + 9-digit source row
    register_model_configs()
    checkpoint = project / "data/.work/models/laionbuild-tiny-random-seed0.pt"
    model, _, preprocess = open_clip.create_model_and_transforms("laionbuild-tiny", pretrained=str(checkpoint))
    old = os.getcwd()
    os.chdir(project.path)
    try:
        with ShardImages() as images:
            add_downloaded_parts(images, [0, 1])
            pixels = torch.stack([preprocess(Image.open(io.BytesIO(images.read(k))).convert("RGB")) for k in keys])
    finally:
        os.chdir(old)
    captions = [r["TEXT"] for r in rows]
    with torch.no_grad():
        img = model.eval().encode_image(pixels).numpy()
        own = model.encode_text(open_clip.get_tokenizer("laionbuild-tiny")(captions)).numpy()
    text = SentenceTransformer(project.text_model, device="cpu").encode(captions)
    return pd.DataFrame({"key": keys, "language": [r["LANGUAGE"] for r in rows],
                         "similarity": np.einsum("ij,ij->i", _normalised(img), _normalised(text)),
                         "own_tower": np.einsum("ij,ij->i", _normalised(img), _normalised(own))})


def _rerun(project, stages: list[tuple[str, int | None]], *overrides: str) -> None:
    """Compose with more overrides and run `stages` (name, part) again, in-process."""
    from laionbuild.recipe.schema import load_params
    from laionbuild.stages import run_stage

    project.laionbuild("compose", *FAST, *project.overrides, *overrides)
    old, saved = os.getcwd(), dict(os.environ)
    os.chdir(project.path)
    os.environ.update(build_env())
    try:
        cfg = load_params("params.yaml")
        for stage, part in stages:
            run_stage(stage, cfg, part)
    finally:
        os.chdir(old)
        os.environ.clear()
        os.environ.update(saved)


def _select(project, *overrides: str) -> list[str]:
    """Compose with other select rules and run select (and the report) again."""
    _rerun(project, [("select", None), ("report", None)], *overrides)
    return pq.read_table(project / "data/selected/selected.parquet").column("key").to_pylist()


def write_mclip_model(path, bert_of: str, width: int = WIDTH, seed: int = 1) -> str:
    """An M-CLIP model folder (multilingual_clip): the text model's BERT as its base (a local
    folder, so it loads offline) and a random linear map to `width`."""
    import torch
    from multilingual_clip import Config_MCLIP, pt_multilingual_clip
    from transformers import BertTokenizerFast

    bert = Path(bert_of).parent / f"{Path(bert_of).name}-bert"
    torch.manual_seed(seed)
    model = pt_multilingual_clip.MultilingualCLIP(Config_MCLIP.MCLIPConfig(
        modelBase=str(bert), transformerDimSize=24, imageDimSize=width))
    model.save_pretrained(path)
    BertTokenizerFast.from_pretrained(bert).save_pretrained(path)
    return str(path)


def test_laion2b_multi_builds_end_to_end_with_the_pair_recorded(multi):
    funnel = json.loads((multi / "data/metrics/funnel.json").read_text())
    kept_tags = [r for p in (0, 1) for r in multi.data[p] if r["NSFW"] != "NSFW"]
    assert funnel["after_nsfw"] == len(kept_tags) and funnel["downloaded_ok"] == funnel["tagged"] == len(kept_tags)
    model = json.loads((multi / "data/embed/part_0/model.json").read_text())
    assert model["architecture"] == "laionbuild-tiny" and model["dim"] == WIDTH
    text = model["text_model"]
    assert text["path"] == multi.text_model and text["kind"] == "sentence_transformers" and text["dim"] == WIDTH
    card = json.loads((multi / "data/card.json").read_text())
    assert card["models"]["embed.model"]["text_model"] == text
    assert f"captions embedded by `embed.text_model`: {multi.text_model} (sentence_transformers" in \
        (multi / "data/card.md").read_text()
    # the text encoder's files are an input of embed: every one fingerprinted
    recorded = json.loads((multi / "data/inputs/models.json").read_text())["inputs"]
    assert sorted(recorded) == sorted(str(p) for p in Path(multi.text_model).rglob("*") if p.is_file())
    prepared = pq.read_table(multi / "data/prepared/part_0/metadata.parquet")
    assert prepared.column("language").to_pylist() == [r["LANGUAGE"] for r in multi.data[0] if r["NSFW"] != "NSFW"]


def test_a_text_query_is_embedded_by_the_text_model(multi):
    import faiss
    from sentence_transformers import SentenceTransformer

    from .test_build import _json_tail

    caption = "кошка на пляже"
    query = _normalised(SentenceTransformer(multi.text_model, device="cpu").encode([caption])).astype(np.float32)
    scores, rows = faiss.read_index(str(multi / "data/index/image.index")).search(query, 3)
    meta = pd.concat([pd.read_parquet(p) for p in sorted((multi / "data/embeddings/metadata").glob("*.parquet"))],
                     ignore_index=True)
    found = _json_tail(multi.laionbuild("query", "--text", caption, "-k", "3", "--json").output)
    assert [f["key"] for f in found] == meta["key"].iloc[rows[0]].tolist()
    np.testing.assert_allclose([f["score"] for f in found], scores[0], atol=1e-4)


def test_similarities_equal_a_direct_computation_with_the_two_models(multi):
    tags, direct = _tagged(multi), _direct(multi)
    assert tags["key"].tolist() == direct["key"].tolist()
    # the image embeddings are stored as float16
    np.testing.assert_allclose(tags["clip_similarity"], direct["similarity"], atol=TOLERANCE)
    # and not what the image model's own text tower gives
    assert not np.allclose(tags["clip_similarity"], direct["own_tower"], atol=0.05)
    text = np.load(multi / "data/embed/part_0/text_emb/text_emb_0.npy")
    assert text.shape[1] == WIDTH and len(set(np.round(direct["similarity"], 3))) > len(direct) // 2


TOLERANCE = 3e-3  # stored similarities against direct ones (image embeddings are stored as float16)


def _threshold_inside(similarities) -> float:
    """A threshold in the middle half of `similarities`, in the widest gap there (so that no
    sample lies within the tolerance of it)."""
    s = np.sort(np.asarray(similarities))
    low, high = len(s) // 4, max(len(s) * 3 // 4, len(s) // 4 + 1)
    i = max(range(low, min(high, len(s) - 1)), key=lambda j: s[j + 1] - s[j])
    assert s[i + 1] - s[i] > 2 * TOLERANCE, s
    return round(float(s[i] + s[i + 1]) / 2, 5)


def test_the_026_rule_selects_what_a_direct_computation_selects(multi):
    direct = _direct(multi)
    assert not np.any(np.abs(direct["similarity"] - 0.26) < TOLERANCE)  # no sample on the edge
    assert 0 < (direct["similarity"] >= 0.26).sum() < len(direct)  # the rule keeps some and drops some
    selected = pq.read_table(multi / "data/selected/selected.parquet").column("key").to_pylist()
    assert selected == direct.loc[direct["similarity"] >= 0.26, "key"].tolist()
    # per language, the report's kept shares are those of the selection
    languages = {r["language"]: r for r in json.loads((multi / "data/metrics/languages.json").read_text())}
    for code, group in direct.groupby("language"):
        kept = int((group["similarity"] >= 0.26).sum())
        assert (languages[code]["tagged"], languages[code]["selected"]) == (len(group), kept)
    assert sum(r["tagged"] for r in languages.values()) == len(direct)
    assert "Kept share per language" in (multi / "data/report/index.html").read_text()


def test_a_per_language_rule_selects_what_a_direct_computation_selects(multi):
    direct = _direct(multi)
    by_language = {code: _threshold_inside(direct.loc[direct["language"] == code, "similarity"]) for code in ("de", "ja")}
    mapping = "{" + ", ".join(f"{k}: {v}" for k, v in by_language.items()) + "}"
    selected = _select(multi, f"++select.min_clip_similarity_by_language={mapping}")
    thresholds = direct["language"].map(by_language).fillna(0.26)
    expected = direct.loc[direct["similarity"] >= thresholds, "key"].tolist()
    assert selected == expected
    kept = direct[direct["similarity"] >= thresholds]
    for code in by_language:  # the threshold keeps some of the language and drops some
        assert 0 < (kept["language"] == code).sum() < (direct["language"] == code).sum()
    languages = {r["language"]: r for r in json.loads((multi / "data/metrics/languages.json").read_text())}
    assert {c: r["selected"] for c, r in languages.items()} == kept["language"].value_counts().to_dict() | {
        c: 0 for c in set(direct["language"]) - set(kept["language"])}
    # no global minimum: the other languages keep every sample
    selected = _select(multi, "select.min_clip_similarity=null", f"++select.min_clip_similarity_by_language={mapping}")
    thresholds = direct["language"].map(by_language).fillna(-1.0)
    assert selected == direct.loc[direct["similarity"] >= thresholds, "key"].tolist()


def test_the_pair_is_refused_at_compose_when_it_cannot_work(tmp_path):
    def refused(*overrides: str, recipe: str = "laion2b_multi") -> str:
        with pytest.raises(LaionbuildError) as info:
            compose([f"recipe={recipe}", *overrides], conf_dir=ROOT / "conf")
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "`embed.text_model`" in refused() and "must be given" in refused()
    narrow = write_text_model(tmp_path / "narrow", width=24)
    message = refused("embed.model=laionbuild-tiny", "embed.pretrained=random", f"embed.text_model={narrow}")
    assert "24 dimensions" in message and "laionbuild-tiny" in message and "32" in message
    assert "no such folder" in refused(f"embed.text_model={tmp_path / 'absent'}")
    (tmp_path / "not_a_model").mkdir()
    assert "neither a sentence-transformers model" in refused(f"embed.text_model={tmp_path / 'not_a_model'}")
    wide = write_text_model(tmp_path / "wide", width=512)  # ViT-B-32's width: composes
    cfg = compose(["recipe=laion2b_multi", f"embed.text_model={wide}"], conf_dir=ROOT / "conf")
    assert cfg.embed.text_model == wide and cfg.select.min_clip_similarity == 0.26 and cfg.source.name == "laion2b_multi"
    assert cfg.source.columns["language"] == "LANGUAGE" and cfg.prepare.nsfw.drop == ["NSFW"]
    nolang = compose(["recipe=laion1b_nolang", f"embed.text_model={wide}"], conf_dir=ROOT / "conf")
    assert nolang.source.name == "laion1b_nolang" and nolang.select.min_clip_similarity == 0.26
    # a per-language rule needs a language column
    message = refused(f"embed.text_model={wide}", "++select.min_clip_similarity_by_language={de: 0.2}",
                      recipe="laion1b_nolang")
    assert "`select.min_clip_similarity_by_language`" in message and "source.columns.language" in message
    message = refused(f"embed.text_model={wide}", "prepare.languages=[de]")
    assert "`prepare.languages`" in message and "source.columns.language" in message


def test_spark_embeds_the_captions_with_the_text_model_as_local_does(multi, shared_spark):
    """clip-retrieval's pyspark distributor with use_mclip: each executor loads the folder."""
    part = multi / "data/embed/part_1"
    local = {kind: np.load(part / f"{kind}/{kind}_0.npy") for kind in ("img_emb", "text_emb")}
    _rerun(multi, [("embed", 1)], "engine=spark", "engine.master=active")
    assert json.loads((part / "model.json").read_text())["text_model"]["path"] == multi.text_model
    for kind, expected in local.items():
        np.testing.assert_allclose(np.load(part / f"{kind}/{kind}_0.npy"), expected, atol=1e-5)


def test_an_mclip_text_model_embeds_the_captions_as_multilingual_clip_does(multi, tmp_path):
    import torch
    from multilingual_clip import pt_multilingual_clip
    from transformers import AutoTokenizer

    from laionbuild.models import text_encoders

    folder = write_mclip_model(tmp_path / "mclip", multi.text_model)
    assert (text_encoders.kind(folder), text_encoders.dim(folder)) == ("mclip", WIDTH)
    base = ["recipe=laion2b_multi", "embed.model=laionbuild-tiny", "embed.pretrained=random", f"embed.text_model={folder}"]
    assert compose(base, conf_dir=ROOT / "conf").embed.text_model == folder
    with pytest.raises(LaionbuildError, match="M-CLIP model embeds on the local engine only"):
        compose([*base, "engine=spark"], conf_dir=ROOT / "conf")
    # embed part 0 again with it: the captions' embeddings are M-CLIP's own forward pass
    _rerun(multi, [("inputs", None), ("embed", 0), ("tag", 0)], f"embed.text_model={folder}")
    model = json.loads((multi / "data/embed/part_0/model.json").read_text())
    assert model["text_model"]["kind"] == "mclip" and model["text_model"]["path"] == folder
    captions = pd.read_parquet(multi / "data/embed/part_0/metadata/metadata_0.parquet")["caption"].tolist()
    mclip = pt_multilingual_clip.MultilingualCLIP.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = mclip.forward(captions, AutoTokenizer.from_pretrained(folder)).numpy()
    text = np.load(multi / "data/embed/part_0/text_emb/text_emb_0.npy")
    np.testing.assert_allclose(text, _normalised(expected), atol=1e-5)
    img = np.load(multi / "data/embed/part_0/img_emb/img_emb_0.npy")
    tags = pd.read_parquet(multi / "data/tags/part_0/tags.parquet")
    np.testing.assert_allclose(tags["clip_similarity"], np.einsum("ij,ij->i", _normalised(img), _normalised(expected)),
                               atol=1e-5)
