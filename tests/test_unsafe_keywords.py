"""select.unsafe_keywords (laionbuild/metadata/keywords.py): "score above X and the caption holds
a listed keyword" drops exactly the samples a direct computation (Python's re, whole words, any
case) says, counted as the funnel step `unsafe_keywords`; the keyword file is an outside input,
so editing it reruns select (and what follows it), never a per-part stage."""

from __future__ import annotations

import json
import re

import pandas as pd
import pyarrow.parquet as pq
import pytest

from laionbuild.metadata.keywords import pattern
from laionbuild.recipe.errors import LaionbuildError
from laionbuild.recipe.schema import compose

from .conftest import ROOT
from .shared_demo import RECIPE, copy_of, shared_demo

KEYWORDS = "# a comment line, skipped\nRED\n\nwhite background\nstripe\ntissue\n"


def python_match(words: list[str], caption: str) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", caption or "", re.IGNORECASE) for w in words)


def expected(project, before: list[str], words: list[str], above: float) -> list[str]:
    meta = pd.concat([pd.read_parquet(project / f"data/deduped/part_{p}/metadata.parquet") for p in (0, 1)])
    row = meta.set_index("key")
    return [k for k in before if not (row.loc[k, "similarity"] > above and python_match(words, row.loc[k, "caption"]))]


def selected(project) -> list[str]:
    return pq.read_table(project / "data/selected/selected.parquet").column("key").to_pylist()


def test_keywords_and_score_drop_exactly_the_matching_samples_and_an_edit_reruns_select(tmp_path_factory):
    shared, _ = shared_demo(tmp_path_factory)
    project = copy_of(shared, tmp_path_factory.mktemp("keywords") / "project")
    before = selected(project)
    keywords = project.path.parent / "keywords.txt"
    keywords.write_text(KEYWORDS)
    above = 0.3
    rule = [f"select.unsafe_keywords={{score: similarity, above: {above}, keywords: '{keywords}'}}"]
    first = project.build(*RECIPE, *rule)
    assert "select" in first.ran and not [s for s in first.ran if "@" in s], first.ran
    words = ["RED", "white background", "stripe", "tissue"]
    want = expected(project, before, words, above)
    assert selected(project) == want and 0 < len(want) < len(before)
    stats = json.loads((project / "data/selected/stats.json").read_text())
    assert stats["counts"]["after_unsafe_keywords"] == len(want) and stats["rules"][-1] == "unsafe_keywords"
    # whole words only: `stripe` matches no "stripes" caption, so those samples stay
    meta = pd.concat([pd.read_parquet(project / f"data/deduped/part_{p}/metadata.parquet") for p in (0, 1)])
    stripes = meta[meta["caption"].str.contains("stripes") & ~meta["caption"].str.contains("red|white background")]
    assert set(stripes["key"]) & set(before) <= set(selected(project))

    keywords.write_text(KEYWORDS + "cameraman\n")
    assert project.status_reasons()["select"] == ("stale", f"file: {keywords}")
    edited = project.build(*RECIPE, *rule)
    assert "select" in edited.ran and not [s for s in edited.ran if "@" in s or s == "dedup"], edited.ran
    assert selected(project) == expected(project, before, [*words, "cameraman"], above) != want
    card = (project / "data/card.md").read_text()
    assert "## Safety lists" in card and str(keywords) in card

    # the score a tag column (clip_similarity, in data/tags) rather than a metadata column
    tags = pd.concat([pd.read_parquet(project / f"data/tags/part_{p}/tags.parquet") for p in (0, 1)]).set_index("key")
    median = float(tags.loc[before, "clip_similarity"].median())
    tagged = [f"select.unsafe_keywords={{score: clip_similarity, above: {median!r}, keywords: '{keywords}'}}"]
    assert "select" in project.build(*RECIPE, *tagged).ran
    captions = meta.set_index("key")["caption"]
    words = [*words, "cameraman"]
    assert selected(project) == [k for k in before if not (tags.loc[k, "clip_similarity"] > median
                                                          and python_match(words, captions[k]))] != before


def test_the_pattern_matches_whole_words_in_any_case():
    import duckdb

    regex = pattern(["gun", "c++", "white background", "émeute"])

    def matches(caption: str) -> bool:
        return duckdb.execute("SELECT regexp_matches(?, ?)", [caption, regex]).fetchone()[0]

    for caption in ("a Gun!", "GUN", "gun", "learn C++ today", "on a WHITE background", "une ÉMEUTE.", "x_y gun"):
        assert matches(caption), caption
    for caption in ("guns", "begun", "gun_shop", "white backgrounds", "émeutes", "", "ak47gun"):
        assert not matches(caption), caption


def test_an_unset_keyword_file_or_score_column_is_refused(tmp_path):
    with pytest.raises(LaionbuildError, match=r"`select.unsafe_keywords.keywords`.*must be given"):
        compose(["select.unsafe_keywords={score: nsfw_score, above: 0.95, keywords: '???'}"], conf_dir=ROOT / "conf")
