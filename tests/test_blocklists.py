"""prepare.blocklists (laionbuild/metadata/blocklists.py): hash lists of URL digests and sample
ids in every supported format drop exactly the rows a direct hashlib computation says, each list
counted as its own funnel step; a new version of a list reruns prepare (and what follows) for
every part through real DVC; a list that cannot be read, or cannot be matched, is refused with
its file named."""

from __future__ import annotations

import gzip
import hashlib
import json
import random

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laionbuild.project.outputs import step_order
from laionbuild.recipe.errors import LaionbuildError
from laionbuild.recipe.schema import compose

from .conftest import ROOT
from .standins import LAION400M_NAME, LAION400M_SCHEMA, laion400m_rows


def md5(url: str) -> str:
    return hashlib.md5(url.encode("utf-8")).hexdigest()


def sha256(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


@pytest.fixture
def parts(tmp_path):
    """Two LAION-400M-style parts; some URLs non-ASCII, with spaces or query strings (hashed as
    they are, never normalised)."""
    rng = random.Random(7)
    directory = tmp_path / "source"
    directory.mkdir()
    data = {}
    for part in (0, 1):
        rows = laion400m_rows(part, 120, rng)
        for i in range(0, 120, 9):
            rows[i]["URL"] = f"http://bücher.example.com/ä {part}-{i}.jpg?x=1&y=ü"
        data[part] = rows
        pq.write_table(pa.Table.from_pylist(rows, schema=LAION400M_SCHEMA), directory / LAION400M_NAME.format(part=part))
    return directory, data


def write_lists(folder, data, rng):
    """Lists in every format, each hitting some rows of both parts (and holding entries no row has)."""
    folder.mkdir(exist_ok=True)
    rows = data[0] + data[1]
    pick = {name: rng.sample(rows, 15) for name in ("md5txt", "sha_gz", "ids_csv", "md5_parquet", "sha_csv_gz")}
    noise = [md5(f"http://nowhere/{i}") for i in range(50)]
    (folder / "md5.txt").write_text("\n".join([md5(r["URL"]) for r in pick["md5txt"]] + noise) + "\n")
    with gzip.open(folder / "sha.txt.gz", "wt") as f:  # upper case, surrounding spaces, a repeated entry
        f.write("\n".join(f" {sha256(r['URL']).upper()} " for r in pick["sha_gz"] + pick["sha_gz"][:3]) + "\n")
    pd.DataFrame({"reason": "x", "sid": [r["SAMPLE_ID"] for r in pick["ids_csv"]]}).to_csv(folder / "ids.csv",
                                                                                           index=False)
    pq.write_table(pa.table({"hash": [md5(r["URL"]) for r in pick["md5_parquet"]] + noise}), folder / "md5.parquet")
    with gzip.open(folder / "sha.csv.gz", "wt") as f:
        f.write("sha256\n" + "\n".join(sha256(r["URL"]) for r in pick["sha_csv_gz"]) + "\n")
    return pick


def lists_override(folder) -> str:
    entries = [("iwf", "md5.txt", "url_md5", None), ("sio", "sha.txt.gz", "url_sha256", None),
               ("ids", "ids.csv", "sample_id", "sid"), ("c3p", "md5.parquet", "url_md5", None),
               ("sio_csv", "sha.csv.gz", "url_sha256", None)]
    body = ", ".join(f"{{name: {n}, path: '{folder / p}', match: {m}" + (f", column: {c}}}" if c else "}")
                     for n, p, m, c in entries)
    return f"prepare.blocklists=[{body}]"


def expected(data, part, folder) -> tuple[list[str], dict[str, int]]:
    """(kept keys, rows left after each list) computed from the files with hashlib and pandas."""
    lists = [("iwf", lambda r: md5(r["URL"]), set((folder / "md5.txt").read_text().split())),
             ("sio", lambda r: sha256(r["URL"]),
              {h.strip().lower() for h in gzip.open(folder / "sha.txt.gz", "rt").read().splitlines()}),
             ("ids", lambda r: str(r["SAMPLE_ID"]), set(pd.read_csv(folder / "ids.csv")["sid"].astype(str))),
             ("c3p", lambda r: md5(r["URL"]), set(pq.read_table(folder / "md5.parquet").column("hash").to_pylist())),
             ("sio_csv", lambda r: sha256(r["URL"]), set(pd.read_csv(folder / "sha.csv.gz")["sha256"]))]
    keys = [f"{part:05d}{i:09d}" for i in range(len(data[part]))]
    alive = list(range(len(data[part])))
    counts = {}
    for name, value, entries in lists:
        alive = [i for i in alive if value(data[part][i]) not in entries]
        counts[f"after_blocklist_{name}"] = len(alive)
    return [keys[i] for i in alive], counts


def stats(project, part) -> dict:
    return json.loads((project / f"data/prepared/part_{part}/stats.json").read_text())


def test_lists_drop_exactly_the_matching_rows_and_a_new_version_reruns_prepare(project, parts, tmp_path):
    directory, data = parts
    folder = tmp_path / "lists"
    write_lists(folder, data, random.Random(3))
    recipe = ["recipe=laion400m", f"source.base_url={directory}", "source.num_parts=2", "subset.parts=[0,1]",
              "prepare.nsfw.drop=[]", "dedup.keys=[]", lists_override(folder), "--stage", "dedup"]
    first = project.build(*recipe)
    # each list is a funnel step of its own, in recipe order, right after has_url
    cfg = compose(recipe[:-2], conf_dir=ROOT / "conf")
    assert step_order(cfg)[1:7] == ["after_has_url", *expected(data, 0, folder)[1]]
    assert {"prepare@0", "prepare@1"} <= set(first.ran)
    for part in (0, 1):
        keys, counts = expected(data, part, folder)
        got = pq.read_table(project / f"data/prepared/part_{part}/metadata.parquet")
        assert got.column("key").to_pylist() == keys  # exactly those rows, in build order
        s = stats(project, part)
        assert s["counts"]["rows_in"] == 120 and s["counts"]["after_has_url"] == 120
        assert {k: s["counts"][k] for k in counts} == counts
        assert all(0 < c < 120 for c in counts.values()) and counts["after_blocklist_sio_csv"] < 110
        assert [b["name"] for b in s["blocklists"]] == ["iwf", "sio", "ids", "c3p", "sio_csv"]
    # what each part's stats record as matched: every row the list names (before any other rule)
    listed = set((folder / "md5.txt").read_text().split())
    for part in (0, 1):
        matched = {b["name"]: b["matched_rows"] for b in stats(project, part)["blocklists"]}
        assert matched["iwf"] == sum(md5(r["URL"]) in listed for r in data[part]) > 0

    assert project.build(*recipe).ran == []  # unchanged lists: nothing reruns
    # a new version of one list (one more hash, of a row still kept): every part's prepare reruns
    kept = pq.read_table(project / "data/prepared/part_1/metadata.parquet").column("url").to_pylist()
    with (folder / "md5.txt").open("a") as f:
        f.write(md5(kept[0]) + "\n")
    assert project.status_reasons()["prepare@0"] == ("stale", f"file: {folder / 'md5.txt'}")
    again = project.build(*recipe)
    assert sorted(again.ran) == ["dedup", "prepare@0", "prepare@1"]
    for part in (0, 1):
        keys, counts = expected(data, part, folder)
        assert pq.read_table(project / f"data/prepared/part_{part}/metadata.parquet").column("key").to_pylist() == keys
    assert stats(project, 1)["counts"]["after_blocklist_iwf"] == expected(data, 1, folder)[1]["after_blocklist_iwf"]


def test_lists_refused_at_compose(tmp_path):
    def refused(*overrides) -> str:
        with pytest.raises(LaionbuildError) as info:
            compose(["recipe=laion400m", *overrides], conf_dir=ROOT / "conf")
        message = str(info.value)
        assert "\n" not in message
        return message

    one = "prepare.blocklists=[{name: iwf, path: '/lists/iwf.txt', match: url_md5}]"
    assert "engine=spark does not apply hash lists" in refused(one, "engine=spark")
    assert "`prepare.blocklists.0.path`" in refused("prepare.blocklists=[{name: iwf, path: '???', match: url_md5}]")
    assert "prepare.blocklists.0.path=/lists/iwf.txt" in refused("prepare.blocklists=[{name: iwf, match: url_md5}]")
    assert "cannot tell the format of a `.json` file" in refused(
        "prepare.blocklists=[{name: iwf, path: /l/x.json, match: url_md5}]")
    assert "`prepare.blocklists.1.name`" in refused(
        "prepare.blocklists=[{name: a, path: /l/x.txt}, {name: a, path: /l/y.txt}]")
    assert "url_md5, url_sha256, sample_id, image_md5 or image_sha256" in refused(
        "prepare.blocklists=[{name: a, path: /l/x.txt, match: image_phash}]").replace("'", "")
    assert "an image-hash list is matched after the download" in refused(  # (tests/test_image_blocklists.py)
        "prepare.blocklists=[{name: a, path: /l/x.txt, match: image_sha256}]")
    message = refused("prepare.blocklists=[{name: a, path: /l/x.txt, match: sample_id}]", "~source.columns.sample_id")
    assert "`prepare.blocklists.0.match`" in message and "source.columns.sample_id" in message


@pytest.mark.parametrize("how", ["two_columns", "no_such_column", "sha_as_md5", "missing", "not_parquet"])
def test_a_list_that_cannot_be_read_or_matched_is_refused_naming_its_file(project, parts, tmp_path, how):
    directory, data = parts
    folder = tmp_path / "bad"
    folder.mkdir()
    name, match, column, want = {
        "two_columns": ("x.csv", "url_md5", None, "2 columns ['a', 'b']: name the one holding the entries"),
        "no_such_column": ("x.csv", "url_md5", "hash", "no column `hash` (.column); the file has ['a', 'b']"),
        "sha_as_md5": ("x.txt", "url_md5", None, "is not a 32-digit hex digest as match=url_md5 needs"),
        "missing": ("gone.txt", "url_md5", None, "no such file"),
        "not_parquet": ("x.parquet", "url_md5", None, "cannot read it as parquet"),
    }[how]
    (folder / "x.csv").write_text("a,b\n" + md5(data[0][0]["URL"]) + ",1\n")
    (folder / "x.txt").write_text(sha256(data[0][0]["URL"]) + "\n")
    (folder / "x.parquet").write_text("not parquet")
    entry = f"{{name: bad, path: '{folder / name}', match: {match}" + (f", column: {column}}}" if column else "}")
    with pytest.raises(LaionbuildError) as info:
        project.build_in_process("recipe=laion400m", f"source.base_url={directory}", "source.num_parts=2",
                                 "subset.parts=[0]", f"prepare.blocklists=[{entry}]", until="prepare")
    message = str(info.value)
    assert str(folder / name) in message and want in message and "\n" not in message, message
    assert not (project / "data/prepared/part_0").exists()


def test_a_remote_list_is_read_once_per_version(project, parts, tmp_path):
    """A list behind an fsspec URL (HTTP here) is copied once per version (its fingerprint in
    data/inputs/blocklists.json) and gives the same rows as the local file."""
    from laionbuild.web.local_server import serve_folder

    directory, data = parts
    folder = tmp_path / "served"
    folder.mkdir()
    first = [md5(r["URL"]) for r in data[0][:40:4]]
    with gzip.open(folder / "iwf.txt.gz", "wt") as f:
        f.write("\n".join(first) + "\n")
    recipe = ["recipe=laion400m", f"source.base_url={directory}", "source.num_parts=2", "subset.parts=[0]",
              "prepare.nsfw.drop=[]"]

    def kept() -> list[str]:
        return pq.read_table(project / "data/prepared/part_0/metadata.parquet").column("url").to_pylist()

    with serve_folder(folder) as url:
        entry = f"prepare.blocklists=[{{name: iwf, path: '{url}/iwf.txt.gz', match: url_md5}}]"
        project.build_in_process(*recipe, entry, until="prepare")
        assert [u for u in kept() if md5(u) in first] == [] and len(kept()) == 120 - sum(
            md5(r["URL"]) in first for r in data[0])
        copies = list((project / "data/.work/inputs").rglob("iwf.txt.gz"))
        assert len(copies) == 1
        more = first + [md5(u) for u in kept()[:5]]  # a new version: one more copy, more rows dropped
        with gzip.open(folder / "iwf.txt.gz", "wt") as f:
            f.write("\n".join(more) + "\n")
        before = len(kept())
        project.build_in_process(*recipe, entry, until="prepare")
        assert len(kept()) == sum(md5(r["URL"]) not in more for r in data[0]) <= before - 5
        assert len(list((project / "data/.work/inputs").rglob("iwf.txt.gz"))) == 2
