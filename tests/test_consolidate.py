"""crawl_csv: raw CSV/TSV files whose columns are named and ordered differently, consolidated
into N shuffled parquet parts (seeded, deterministic), then prepared like any source."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pyarrow.parquet as pq

from .conftest import new_project
from .standins import write_crawl

FAST = ["embed.model=laionbuild-tiny", "embed.pretrained=random"]  # the tiny test model has no pretrained tags


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_crawl_files_consolidate_into_seeded_parts(tmp_path):
    written = write_crawl(tmp_path / "crawl")
    overrides = ["recipe=laion400m", "source=crawl_csv", f"source.base_url={tmp_path / 'crawl'}",
                 "source.consolidate_parts=3", "subset.parts=[0,1,2]", *FAST, "--stage", "dedup"]
    project = new_project(tmp_path / "a")
    project.build(*overrides)
    consolidated = project / "data/consolidated"
    parts = [pq.read_table(consolidated / f"part-{p:05d}.parquet") for p in range(3)]
    assert all(t.schema.names == ["url", "caption"] for t in parts)
    got = [(u, c) for t in parts for u, c in zip(t["url"].to_pylist(), t["caption"].to_pylist())]
    assert Counter(got) == Counter(written)  # every row exactly once, columns lined up
    assert all(len(t) > len(written) / 3 / 2 for t in parts)  # balanced
    assert [r[0] for r in got[:10]] != [w[0] for w in written[:10]]  # shuffled
    info = json.loads((consolidated / "consolidate.json").read_text())
    assert info["rows"] == len(written) and len(info["inputs"]) == 5

    prepared = [pq.read_table(project / f"data/deduped/part_{p}/metadata.parquet") for p in range(3)]
    assert sum(len(t) for t in prepared) == len(written)
    assert prepared[1]["key"][0].as_py() == "00001000000000"

    again = new_project(tmp_path / "b", cache="own")  # deterministic: byte-identical parts in a fresh project
    again.build(*overrides)
    assert [digest(again / f"data/consolidated/part-{p:05d}.parquet") for p in range(3)] == \
        [digest(consolidated / f"part-{p:05d}.parquet") for p in range(3)]

    other_seed = project.build(*overrides, "source.consolidate_seed=1")
    assert "consolidate" in other_seed.ran
    assert pq.read_table(consolidated / "part-00000.parquet")["url"].to_pylist() != parts[0]["url"].to_pylist()


def test_files_without_consolidation_are_parts_in_name_order(tmp_path):
    write_crawl(tmp_path / "crawl", rows_per_file=5)
    project = new_project(tmp_path / "p")
    project.build("recipe=laion400m", "source=crawl_csv", f"source.base_url={tmp_path / 'crawl'}",
                  "source.consolidate_parts=null", "subset.parts=[1,3]", *FAST, "--stage", "dedup")
    assert json.loads((project / "data/raw/part_3/fetch.json").read_text())["file"] == "crawl_003.tsv"
    part3 = pq.read_table(project / "data/deduped/part_3/metadata.parquet").to_pylist()
    assert part3[0]["url"] == "http://crawl3.example/0.jpg" and part3[0]["caption"] == "crawled caption 3 0"


def test_a_file_without_any_alias_fails_naming_it(tmp_path):
    write_crawl(tmp_path / "crawl", rows_per_file=3)
    (tmp_path / "crawl" / "crawl_009.csv").write_text("link,words\nhttp://x/1.jpg,hello\n")
    project = new_project(tmp_path / "p")
    result = project.build("recipe=laion400m", "source=crawl_csv", f"source.base_url={tmp_path / 'crawl'}",
                           "subset.parts=[0]", *FAST, "--stage", "dedup", check=False)
    assert result.returncode != 0
    assert "crawl_009.csv" in result.output and "source.columns.url" in result.output
    assert not (project / "data/consolidated").exists()
