"""fetch, prepare and dedup on stand-ins of the real sources: LAION-400M parts, MS-COCO, the
LAION-Face id list; served over loopback HTTP and from a local dir. Expected rows are computed
independently with pandas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from laionbuild.web.local_server import serve_folder

from .standins import LAION400M_NAME, write_laion400m, write_mscoco

FAST = ["embed.model=laionbuild-tiny", "embed.pretrained=random"]  # the tiny test model has no pretrained tags


def prepared(project, parts, stage="dedup") -> pd.DataFrame:
    directory = "deduped" if stage == "dedup" else "prepared"
    return pd.concat([pd.read_parquet(project / f"data/{directory}/part_{p}/metadata.parquet") for p in parts],
                     ignore_index=True)


def stats(project, stage_dir, part) -> dict:
    return json.loads((project / f"data/{stage_dir}/part_{part}/stats.json").read_text())["counts"]


def expected_laion400m(data, parts, nsfw_drop=("NSFW",), drop_missing=False) -> pd.DataFrame:
    frames = []
    for p in parts:
        frame = pd.DataFrame(data[p])
        frame["key"] = [f"{p:05d}{i:09d}" for i in range(len(frame))]
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    keep = rows["NSFW"].isna() & (not drop_missing) | rows["NSFW"].notna() & ~rows["NSFW"].isin(nsfw_drop)
    return rows[keep].drop_duplicates(["URL", "TEXT"], keep="first")


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    directory = tmp_path_factory.mktemp("laion400m")
    return directory, write_laion400m(directory)


def test_laion400m_over_http_equals_local_dir_and_pandas(project, laion, tmp_path):
    directory, data = laion
    with serve_folder(directory) as url:
        project.build("recipe=laion400m", f"source.base_url={url}", "subset.parts=[0,1,2]", *FAST,
                      "--stage", "dedup")
    from .conftest import new_project

    local = new_project(tmp_path / "local")
    local.build("recipe=laion400m", f"source.base_url={directory}", "subset.parts=[0,1,2]", *FAST, "--stage", "dedup")
    got = prepared(project, [0, 1, 2])
    pd.testing.assert_frame_equal(got, prepared(local, [0, 1, 2]))

    want = expected_laion400m(data, [0, 1, 2])
    assert got["key"].tolist() == want["key"].tolist()
    assert got["url"].tolist() == want["URL"].tolist() and got["sample_id"].tolist() == want["SAMPLE_ID"].tolist()
    assert {"key", "url", "caption", "sample_id", "width", "height", "license", "nsfw", "similarity"} <= set(got)
    assert not got.duplicated(["url", "caption"]).any()
    # the stand-in has duplicates across parts; the earlier part's row is the one kept
    part0 = {(u, t) for u, t, k in zip(got["url"], got["caption"], got["key"]) if k.startswith("00000")}
    later = [(r["URL"], r["TEXT"]) for r in data[1] + data[2]]
    assert sum(pair in part0 for pair in later) > 0
    for p in range(3):  # the counts add up
        s = stats(project, "prepared", p)
        assert s["rows_in"] == 200 and s["rows_in"] >= s["after_has_url"] >= s["after_nsfw"]
        assert s["after_nsfw"] == len(pd.read_parquet(project / f"data/prepared/part_{p}/metadata.parquet"))
    assert sum(stats(project, "deduped", p)["after_dedup"] for p in range(3)) == len(got)
    fetch = json.loads((project / "data/raw/part_1/fetch.json").read_text())
    assert fetch["file"] == LAION400M_NAME.format(part=1) and fetch["url"].startswith("http://127.0.0.1:")


def test_adding_an_earlier_part_changes_later_parts_only_as_dedup_says(project, laion):
    directory, data = laion
    project.build("recipe=laion400m", f"source.base_url={directory}", "subset.parts=[1,2]", *FAST, "--stage", "dedup")
    alone = prepared(project, [1, 2])
    assert alone["key"].tolist() == expected_laion400m(data, [1, 2])["key"].tolist()
    result = project.build("recipe=laion400m", f"source.base_url={directory}", "subset.parts=[0,1,2]", *FAST,
                           "--stage", "dedup")
    assert sorted(result.ran) == ["dedup", "fetch@0", "prepare@0"]
    assert prepared(project, [0, 1, 2])["key"].tolist() == expected_laion400m(data, [0, 1, 2])["key"].tolist()


@pytest.mark.parametrize("overrides,drop,drop_missing", [
    (["prepare.nsfw.drop=[NSFW,UNSURE]"], ("NSFW", "UNSURE"), False),
    (["prepare.nsfw.drop_missing=true"], ("NSFW",), True),  # the LAION2B SISAP rule
    (["prepare.nsfw.drop=[]"], (), False),
])
def test_nsfw_policy_treats_missing_tags_explicitly(project, laion, overrides, drop, drop_missing):
    directory, data = laion
    project.build("recipe=laion400m", f"source.base_url={directory}", "subset.parts=[0]", *FAST, *overrides,
                  "--stage", "dedup")
    want = expected_laion400m(data, [0], nsfw_drop=drop, drop_missing=drop_missing)
    assert prepared(project, [0])["key"].tolist() == want["key"].tolist()


def test_metadata_filters_match_pandas_and_are_counted(project, laion):
    directory, data = laion
    overrides = ["prepare.min_similarity=0.3", "prepare.min_caption_chars=5", "prepare.max_caption_words=8",
                 "prepare.min_width=100", "prepare.min_height=100", "prepare.max_aspect_ratio=3",
                 "dedup.keys=[]"]
    project.build("recipe=laion400m", f"source.base_url={directory}", "subset.parts=[0]", *FAST, *overrides,
                  "--stage", "dedup")
    rows = pd.DataFrame(data[0])
    rows["key"] = [f"{0:05d}{i:09d}" for i in range(len(rows))]
    steps = [
        ("after_nsfw", rows["NSFW"].isna() | (rows["NSFW"] != "NSFW")),
        ("after_min_similarity", rows["similarity"] >= 0.3),
        ("after_min_caption_chars", rows["TEXT"].str.len() >= 5),
        ("after_max_caption_words", rows["TEXT"].str.split().str.len() <= 8),
        ("after_min_width", rows["WIDTH"] >= 100),
        ("after_min_height", rows["HEIGHT"] >= 100),
        ("after_max_aspect_ratio", np.maximum(rows["WIDTH"], rows["HEIGHT"])
         <= 3 * np.minimum(rows["WIDTH"], rows["HEIGHT"])),
    ]
    counts = stats(project, "prepared", 0)
    mask = pd.Series(True, index=rows.index)
    for name, condition in steps:
        mask &= condition.fillna(False)
        assert counts[name] == int(mask.sum()), name
    assert prepared(project, [0])["key"].tolist() == rows.loc[mask, "key"].tolist()


def test_mscoco_url_dedup_keeps_every_caption(project, tmp_path):
    rows = write_mscoco(tmp_path / "coco", images=30)
    project.build("recipe=mscoco_face", f"source.base_url={tmp_path / 'coco'}", *FAST, "--stage", "dedup")
    got = prepared(project, [0])
    assert len(got) == 30 and got["url"].is_unique
    frame = pd.DataFrame(rows)
    for _, row in got.iterrows():
        captions = frame.loc[frame["URL"] == row["url"], "TEXT"].tolist()  # in source row order
        assert list(row["captions"]) == captions and row["caption"] == captions[0]
    assert "source_key" in got.columns  # the source's own `key` column is kept, renamed
    assert stats(project, "deduped", 0)["after_dedup"] == 30 and stats(project, "prepared", 0)["rows_in"] == 150


def test_dedup_in_many_buckets_keeps_the_same_rows(project, laion, tmp_path):
    """The local engine's dedup hash-partitions rows into buckets (dedup.bucket_rows, or its
    memory limit) and keeps the first (part, position) of each key: the rows, order and merged
    captions do not depend on how many buckets there are."""
    directory, data = laion
    project.build("recipe=laion400m", f"source.base_url={directory}", "subset.parts=[0,1,2]", *FAST,
                  "dedup.bucket_rows=37", "--stage", "dedup")
    got = prepared(project, [0, 1, 2])
    want = expected_laion400m(data, [0, 1, 2])
    assert got["key"].tolist() == want["key"].tolist() and got["url"].tolist() == want["URL"].tolist()
    rows = write_mscoco(tmp_path / "coco", images=30)
    project.build("recipe=mscoco_face", f"source.base_url={tmp_path / 'coco'}", *FAST, "dedup.bucket_rows=7",
                  "--stage", "dedup")
    got = prepared(project, [0])
    frame = pd.DataFrame(rows)
    assert len(got) == 30 and got["url"].is_unique
    for _, row in got.iterrows():
        assert list(row["captions"]) == frame.loc[frame["URL"] == row["url"], "TEXT"].tolist()


def _face_ids(data, parts=3, every=3):
    return [torch.tensor([r["SAMPLE_ID"] for r in data[p][::every]]) for p in range(parts)]


@pytest.mark.parametrize("kind", ["pth", "npy", "txt", "parquet"])
def test_id_lists_pick_rows(project, laion, tmp_path, kind):
    directory, data = laion
    ids = _face_ids(data)
    if kind == "pth":
        path = tmp_path / "laion_face_ids.pth"
        torch.save(ids, path)
        parts = [0, 2]
    else:
        flat = np.concatenate([t.numpy() for t in ids])
        path = tmp_path / f"ids.{kind}"
        if kind == "npy":
            np.save(path, flat)
        elif kind == "txt":
            path.write_text("\n".join(map(str, flat)) + "\n")
        else:
            pq.write_table(pa.table({"sample_id": flat}), path)
        parts = [0, 1, 2]
    with serve_folder(tmp_path) as url:  # id lists come over HTTP too
        project.build("recipe=laion_face", f"source.base_url={directory}", f"source.ids_url={url}/{path.name}",
                      f"subset.parts=[{','.join(map(str, parts))}]", "dedup.keys=[]", "prepare.nsfw.drop=[]",
                      *FAST, "--stage", "dedup")
    got = prepared(project, parts)
    want = [sid for p in parts for sid in ids[p].tolist()]
    assert got["sample_id"].tolist() == want
    assert stats(project, "prepared", parts[0])["after_ids"] == len(ids[parts[0]])


def _bad_part(directory: Path, how: str) -> str:
    """Write a broken part 0; return what the error must name."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LAION400M_NAME.format(part=0)
    good = pa.table({"SAMPLE_ID": [1, 2], "URL": ["http://a/1.jpg", "http://a/2.jpg"], "TEXT": ["x", "y"],
                     "HEIGHT": [1, 2], "WIDTH": [1, 2], "LICENSE": ["?", "?"], "NSFW": ["UNLIKELY", None],
                     "similarity": [0.3, 0.4]})
    if how == "missing_column":
        pq.write_table(good.drop(["TEXT"]), path)
        return "TEXT"
    if how == "wrong_dtype":
        pq.write_table(good.set_column(1, "URL", pa.array([1, 2])), path)
        return "URL"
    if how == "corrupt":
        path.write_bytes(b"PAR1 this is not parquet at all PAR1")
        return path.name
    if how == "truncated":
        pq.write_table(good, path)
        path.write_bytes(path.read_bytes()[:-20])
        return path.name
    if how == "empty":
        pq.write_table(good.slice(0, 0), path)
        return "no rows"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["missing_column", "wrong_dtype", "corrupt", "truncated", "empty"])
def test_bad_parts_fail_clearly_and_write_nothing(project, tmp_path, how):
    must_name = _bad_part(tmp_path / "bad", how)
    result = project.build("recipe=laion400m", f"source.base_url={tmp_path / 'bad'}", "subset.parts=[0]", *FAST,
                           "--stage", "dedup", check=False)
    assert result.returncode != 0
    assert must_name in result.output and LAION400M_NAME.format(part=0) in result.output
    assert not (project / "data/prepared/part_0").exists()
    assert not (project / "data/deduped").exists()


def test_id_list_shorter_than_the_part_id_fails_clearly(project, laion, tmp_path):
    directory, data = laion
    torch.save(_face_ids(data, parts=2), tmp_path / "laion_face_ids.pth")
    result = project.build("recipe=laion_face", f"source.base_url={directory}",
                           f"source.ids_url={tmp_path / 'laion_face_ids.pth'}", "subset.parts=[0,2]", *FAST,
                           "--stage", "dedup", check=False)
    assert result.returncode != 0
    assert "laion_face_ids.pth" in result.output and "part 2" in result.output and "2 entries" in result.output
    assert not (project / "data/prepared/part_2").exists()
