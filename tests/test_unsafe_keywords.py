"""tag.unsafe_keywords + select.unsafe_keywords (laionbuild/metadata/keywords.py): "score above X
and the caption holds a listed keyword" drops exactly the samples a direct computation (Python's
re, whole words, any case) says, counted as the funnel step `unsafe_keywords`. The keyword match
is a tag (`unsafe_keyword`, once per part): editing the list reruns tag and what follows, never
embed or download; a new score threshold reruns select and what follows, never tag."""

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


def test_keywords_and_score_drop_exactly_the_matching_samples_and_an_edit_reruns_the_tags(tmp_path_factory):
    shared, _ = shared_demo(tmp_path_factory)
    project = copy_of(shared, tmp_path_factory.mktemp("keywords") / "project")
    before = selected(project)
    keywords = project.path.parent / "keywords.txt"
    keywords.write_text(KEYWORDS)
    above = 0.3
    # the score a metadata column (the source's similarity), carried into the tags
    tagging = [f"tag.unsafe_keywords={keywords}", "tag.source_columns=[similarity]"]
    rule = [*tagging, f"select.unsafe_keywords={{score: similarity, above: {above}}}"]
    first = project.build(*RECIPE, *rule)
    assert {"tag@0", "tag@1", "select"} <= set(first.ran), first.ran
    assert not {s for s in first.ran if "@" in s and not s.startswith("tag@")}, first.ran
    words = ["RED", "white background", "stripe", "tissue"]
    want = expected(project, before, words, above)
    assert selected(project) == want and 0 < len(want) < len(before)
    stats = json.loads((project / "data/selected/stats.json").read_text())
    assert stats["counts"]["after_unsafe_keywords"] == len(want) and stats["rules"][-1] == "unsafe_keywords"
    # whole words only: `stripe` matches no "stripes" caption, so those samples stay
    meta = pd.concat([pd.read_parquet(project / f"data/deduped/part_{p}/metadata.parquet") for p in (0, 1)])
    stripes = meta[meta["caption"].str.contains("stripes") & ~meta["caption"].str.contains("red|white background")]
    assert set(stripes["key"]) & set(before) <= set(selected(project))
    # the tag itself: every tagged sample's match, as Python's re says
    captions = meta.set_index("key")["caption"]
    tags = pd.concat([pd.read_parquet(project / f"data/tags/part_{p}/tags.parquet") for p in (0, 1)]).set_index("key")
    assert tags["unsafe_keyword"].tolist() == [python_match(words, captions[k]) for k in tags.index]

    keywords.write_text(KEYWORDS + "cameraman\n")
    assert project.status_reasons()["tag@0"] == ("stale", f"file: {keywords}")
    edited = project.build(*RECIPE, *rule)
    assert {"tag@0", "tag@1", "select"} <= set(edited.ran), edited.ran
    assert not {s for s in edited.ran if s.split("@")[0] in ("download", "embed", "prepare", "dedup")}, edited.ran
    words = [*words, "cameraman"]
    assert selected(project) == expected(project, before, words, above) != want
    card = (project / "data/card.md").read_text()
    assert "## Safety lists" in card and str(keywords) in card

    # a sweep of the threshold is a selection: no tag reruns, no caption is matched again
    lower = project.build(*RECIPE, *tagging, "select.unsafe_keywords={score: similarity, above: 0.2}")
    assert "select" in lower.ran and not [s for s in lower.ran if "@" in s], lower.ran
    assert selected(project) == expected(project, before, words, 0.2)

    # the score a tag column (clip_similarity) rather than a carried metadata column
    median = float(tags.loc[before, "clip_similarity"].median())
    tagged = [*tagging, f"select.unsafe_keywords={{score: clip_similarity, above: {median!r}}}"]
    assert "select" in project.build(*RECIPE, *tagged).ran
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
    with pytest.raises(LaionbuildError, match=r"`tag.unsafe_keywords`.*must be given"):
        compose(["tag.unsafe_keywords='???'"], conf_dir=ROOT / "conf")
    with pytest.raises(LaionbuildError, match=r"`tag.unsafe_keywords`.*must be given for select.unsafe_keywords"):
        compose(["select.unsafe_keywords={score: clip_similarity, above: 0.95}"], conf_dir=ROOT / "conf")
    with pytest.raises(LaionbuildError, match=r"`select.unsafe_keywords.score`.*tag.source_columns=\[similarity\]"):
        compose([f"tag.unsafe_keywords={tmp_path / 'k.txt'}", "select.unsafe_keywords={score: similarity, above: 0.9}"],
                conf_dir=ROOT / "conf")
