"""The Re-LAION-5B recipes (conf/recipe/relaion_research*.yaml): refused until the user gives the
lists' paths, naming the key to set; composed once given, with the research rule (> 0.95 and a
keyword), resp. also every sample > 0.45 dropped; the dataset card names each list with the
content fingerprint the inputs check recorded."""

from __future__ import annotations

import hashlib

import pytest

from laionbuild.project import inputs
from laionbuild.recipe.errors import LaionbuildError
from laionbuild.recipe.schema import compose

from .conftest import ROOT


def given(folder) -> list[str]:
    return [f"prepare.blocklists.0.path={folder / 'iwf_c3p.txt.gz'}", f"prepare.blocklists.1.path={folder / 'sio.txt'}",
            f"tag.unsafe_keywords={folder / 'keywords.txt'}"]


@pytest.mark.parametrize("recipe", ["relaion_research", "relaion_research_safe"])
def test_the_recipes_want_their_lists_then_compose(recipe, tmp_path):
    missing = given(tmp_path)
    for left_out in range(3):  # each unset path is refused by its key
        with pytest.raises(LaionbuildError) as info:
            compose([f"recipe={recipe}", *missing[:left_out]], conf_dir=ROOT / "conf")
        key = ["prepare.blocklists.0.path", "prepare.blocklists.1.path", "tag.unsafe_keywords"][left_out]
        assert f"`{key}`" in str(info.value) and "must be given" in str(info.value) and "\n" not in str(info.value)
    cfg = compose([f"recipe={recipe}", *missing], conf_dir=ROOT / "conf")
    assert [(e.name, e.match) for e in cfg.prepare.blocklists] == [("iwf_c3p", "url_md5"), ("sio", "url_sha256")]
    rule = cfg.select.unsafe_keywords
    assert (rule.score, rule.above) == ("nsfw_score", 0.95) and "nsfw_score" in cfg.tag.heads
    assert cfg.select.min_clip_similarity == 0.28 and cfg.source.name == "laion2b_en"  # LAION-5B (en)'s pipeline
    assert cfg.select.max_scores == ({"nsfw_score": 0.45} if recipe.endswith("_safe") else {})


def test_the_card_names_each_list_and_its_content_hash(tmp_path, monkeypatch):
    from laionbuild.stages.card import _safety_lists

    (tmp_path / "iwf_c3p.txt.gz").write_bytes(b"gzip'd hashes")
    (tmp_path / "sio.txt").write_text("ab" * 32 + "\n")
    (tmp_path / "keywords.txt").write_text("keyword\n")
    cfg = compose(["recipe=relaion_research_safe", f"source.base_url={tmp_path}", *given(tmp_path)],
                  conf_dir=ROOT / "conf")
    monkeypatch.chdir(tmp_path)
    inputs.write(cfg)
    lists = _safety_lists(cfg)
    assert [s["name"] for s in lists] == ["iwf_c3p", "sio", "keywords"]
    for entry, name in zip(lists, ["iwf_c3p.txt.gz", "sio.txt", "keywords.txt"]):
        assert entry["path"] == str(tmp_path / name)
        assert entry["content"]["md5"] == hashlib.md5((tmp_path / name).read_bytes()).hexdigest()
    assert lists[1]["use"] == "prepare.blocklists (url_sha256)" and "nsfw_score > 0.95" in lists[2]["use"]
