"""prepare.caption_word_list (DataComp's text-based baseline: captions naming an ImageNet-21k
synset): whole-word, case-insensitive matches of a word or phrase of a list file, exactly the
rows a direct computation keeps, counted in the funnel; the file is an outside input, so editing
it reruns prepare (and what follows), and nothing else."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laionbuild.recipe.schema import RecipeError, compose

from .conftest import ROOT, new_project
from .standins import LAION400M_NAME, write_laion400m

CAPTIONS = ["A Golden Retriever on the beach", "golden retrievers", "hot-dog stand", "HOT DOG!", "hotdog",
            "the goldfish bowl", "Goldfish", "a cat", "CAT-like", "concatenate", "", None, "tabby cat, sleeping",
            "Mañana en la PLAYA", "dog", "photo of a red panda", "a panda, red"]
WORDS = "# synsets\ngolden retriever\nhot dog\ngoldfish\n\ncat\nplaya\nred panda\n"
FAST = ["embed.model=laionbuild-tiny", "embed.pretrained=random"]


def direct(captions, phrases: list[str]) -> list[bool]:
    """Whole-word, case-insensitive: the caption's words (regex \\w+ after casefold) contain the
    phrase's words consecutively."""
    def contains(caption):
        if not caption:
            return False
        text = " " + " ".join(re.findall(r"\w+", caption.casefold())) + " "
        return any(" " + " ".join(re.findall(r"\w+", p.casefold())) + " " in text for p in phrases)
    return [contains(c) for c in captions]


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "meta"
    data = write_laion400m(folder, parts=2, rows=60, seed=3)
    for part, rows in data.items():
        for i, row in enumerate(rows):
            row["TEXT"] = CAPTIONS[(i + part * 5) % len(CAPTIONS)]
            row["URL"] = f"http://img.example.com/{part}/{i}.jpg"  # no duplicates: dedup keeps every row
            row["NSFW"] = "UNLIKELY"
        table = pa.Table.from_pylist(rows, schema=pq.read_schema(folder / LAION400M_NAME.format(part=part)))
        pq.write_table(table, folder / LAION400M_NAME.format(part=part))
    return folder, data


def test_captions_with_a_listed_word_are_kept_and_an_edit_reruns_prepare(tmp_path, source):
    folder, data = source
    words = tmp_path / "synsets.txt"
    words.write_text(WORDS)
    project = new_project(tmp_path / "project")
    overrides = ["recipe=laion400m", f"source.base_url={folder}", "subset.parts=[0,1]", *FAST,
                 f"prepare.caption_word_list={words}", "--stage", "dedup"]
    project.build(*overrides)
    phrases = [w for w in WORDS.splitlines() if w and not w.startswith("#")]
    for part in (0, 1):
        captions = [r["TEXT"] for r in data[part]]
        want = [f"{part:05d}{i:09d}" for i, keep in enumerate(direct(captions, phrases)) if keep]
        prepared = pq.read_table(project / f"data/prepared/part_{part}/metadata.parquet")
        assert prepared["key"].to_pylist() == want and 0 < len(want) < len(captions)
        counts = json.loads((project / f"data/prepared/part_{part}/stats.json").read_text())["counts"]
        assert counts["after_caption_words"] == len(want)
    assert direct(["hotdog", "concatenate", "CAT-like", "a panda, red"], phrases) == [False, False, True, False]
    recorded = json.loads((project / "data/inputs/word_list.json").read_text())
    assert list(recorded["inputs"]) == [str(words)]

    unchanged = project.build(*overrides)
    assert unchanged.ran == []
    words.write_text(WORDS + "dog\n")  # the list edited in place: prepare reruns, fetch does not
    edited = project.build(*overrides)
    assert sorted(edited.ran) == ["dedup", "prepare@0", "prepare@1"]
    captions = [r["TEXT"] for r in data[1]]
    want = [f"{1:05d}{i:09d}" for i, keep in enumerate(direct(captions, [*phrases, "dog"])) if keep]
    assert pq.read_table(project / "data/prepared/part_1/metadata.parquet")["key"].to_pylist() == want


def test_a_word_list_that_is_missing_or_spark_is_refused_at_compose(tmp_path):
    with pytest.raises(RecipeError, match=r"prepare\.caption_word_list.*is not a file"):
        compose([f"prepare.caption_word_list={tmp_path / 'missing.txt'}"], conf_dir=ROOT / "conf")
    words = tmp_path / "words.txt"
    words.write_text("cat\n")
    with pytest.raises(RecipeError, match=r"prepare\.caption_word_list.*engine=spark"):
        compose([f"prepare.caption_word_list={words}", "engine=spark"], conf_dir=ROOT / "conf")


def test_a_word_list_without_words_fails_prepare_naming_the_file(tmp_path, source):
    folder, _ = source
    words = tmp_path / "empty.txt"
    words.write_text("# nothing\n\n")
    project = new_project(tmp_path / "project")
    result = project.build("recipe=laion400m", f"source.base_url={folder}", "subset.parts=[0]", *FAST,
                           f"prepare.caption_word_list={words}", "--stage", "prepare", check=False)
    assert result.returncode != 0
    assert f"{words}: the word list (prepare.caption_word_list) has no word" in result.output
