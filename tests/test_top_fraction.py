"""select.top_fraction: the top fraction of the whole build by a tag column, with DataComp's
get_threshold (baselines/utils.py: the value at index int(N * fraction) of the column sorted high
to low; everything >= it is kept, ties included), intersected with the other select rules; a
change of fraction reruns select and what follows only."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from laionbuild.recipe.schema import RecipeError, compose

from .conftest import ROOT
from .shared_demo import RECIPE, copy_of, shared_demo

GLOBAL = ["select", "assemble", "export", "index", "report", "card"]


def datacomp_keeps(values: np.ndarray, fraction: float) -> np.ndarray:
    """DataComp's get_threshold, then `>= threshold`, in numpy."""
    threshold = -np.sort(-values)[int(len(values) * fraction)]
    return values >= threshold


def test_top_fraction_keeps_what_datacomp_keeps_over_all_parts(tmp_path, tmp_path_factory):
    project = copy_of(shared_demo(tmp_path_factory)[0], tmp_path / "project")
    tags = [r for p in (0, 1) for r in pq.read_table(project / f"data/tags/part_{p}/tags.parquet").to_pylist()]
    keys = np.array([t["key"] for t in tags])
    width = np.array([t["width"] for t in tags], float)
    similarity = np.array([t["clip_similarity"] for t in tags], float)
    assert {t["part"] for t in tags} == {0, 1} and not np.isnan(width).any()

    # width has ties; find a fraction whose threshold falls inside a run of equal widths
    fraction = next(f for f in np.arange(0.05, 1.0, 0.05).round(2)
                    if np.sum(width == -np.sort(-width)[int(len(width) * f)]) > 1
                    and datacomp_keeps(width, f).sum() > int(len(width) * f) + 1)
    floor = float(np.median(similarity))
    result = project.build(*RECIPE, f"+select.top_fraction={{width:{fraction}}}", f"select.min_clip_similarity={floor!r}")
    assert result.ran == GLOBAL
    top = datacomp_keeps(width, fraction)
    want = set(keys[top & (similarity >= floor)])
    kept = pq.read_table(project / "data/selected/selected.parquet")["key"].to_pylist()
    assert set(kept) == want and 0 < len(kept) < top.sum()
    assert kept == sorted(kept)  # build order
    funnel = json.loads((project / "data/metrics/funnel.json").read_text())
    assert funnel["after_min_clip_similarity"] == int((similarity >= floor).sum())
    assert funnel["after_top_width"] == funnel["selected"] == len(want)
    stats = json.loads((project / "data/selected/stats.json").read_text())
    assert stats["top_fraction_thresholds"] == {"width": -np.sort(-width)[int(len(width) * fraction)]}
    assert stats["rules"] == ["min_clip_similarity", "top_width"]

    # another fraction, and a second column intersected with it: only select onward reruns
    result = project.build(*RECIPE, "+select.top_fraction={width:0.5,clip_similarity:1.0}",
                           "select.min_clip_similarity=null")
    assert result.ran == GLOBAL
    kept = pq.read_table(project / "data/selected/selected.parquet")["key"].to_pylist()
    assert set(kept) == set(keys[datacomp_keeps(width, 0.5)])  # fraction 1: every sample with a value


@pytest.mark.parametrize("override, fragment", [
    ("+select.top_fraction={width:0}", "greater than 0"),
    ("+select.top_fraction={width:1.5}", "less than or equal to 1"),
    ("+select.top_fraction={aesthetic_score:0.3}", "`aesthetic_score` is not a tag column of this recipe"),
    ("+select.top_fraction={face_count:0.3}", "`face_count` is not a tag column"),
])
def test_a_bad_top_fraction_is_refused_at_compose_naming_the_key(override, fragment):
    with pytest.raises(RecipeError, match="select.top_fraction") as info:
        compose([override], conf_dir=ROOT / "conf")
    assert fragment in str(info.value)


def test_a_fraction_of_a_column_with_nulls_ranks_them_last(tmp_path):
    """The threshold over a DuckDB view, nulls and NaN counted in N and ranked below every value."""
    import duckdb
    import pyarrow as pa

    from laionbuild.stages.selection import top_fraction_threshold

    con = duckdb.connect()
    con.register("tags", pa.table({"s": pa.array([0.5, None, 0.9, float("nan"), 0.5, 0.1, None, 0.7])}))
    # N = 8: index int(8 * 0.5) = 4 of [0.9, 0.7, 0.5, 0.5, 0.1, ...] is 0.1
    assert top_fraction_threshold(con, "s", 0.5) == 0.1
    assert top_fraction_threshold(con, "s", 0.3) == 0.5  # index 2: the tie of 0.5, both kept
    assert top_fraction_threshold(con, "s", 0.9) == 0.1  # index 7 is a null: every value is kept
    con.register("tags", pa.table({"s": pa.array([None, None], pa.float32())}))
    assert top_fraction_threshold(con, "s", 0.5) is None


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_the_threshold_over_the_source_parts_is_datacomps_over_every_row(tmp_path, monkeypatch, fmt):
    """select.top_fraction_of=source: the value over every row of the fetched parts (nulls
    counted in N, ranked last), whether the parts' row counts come from parquet footers (one
    array sized up front) or the parts are read first (csv)."""
    import pandas as pd

    from laionbuild.stages.selection import source_top_fraction_threshold

    cfg = compose([f"source.format={fmt}", "subset.parts=[0,1,2]"],
                  conf_dir=ROOT / "conf")  # (in the checkout: the demo's folders are checked)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    every = []
    for part, n in enumerate([7, 1, 12]):  # (part 1: one row, a null)
        score = rng.random(n).round(3)
        score[::4] = np.nan
        every.append(score)
        frame = pd.DataFrame({"URL": [f"http://127.0.0.1/{part}/{i}.jpg" for i in range(n)],
                              "TEXT": ["a caption"] * n, "SAMPLE_ID": np.arange(n), "WIDTH": 64, "HEIGHT": 64,
                              "LICENSE": "?", "NSFW": "UNLIKELY", "similarity": score})
        raw = tmp_path / "data" / "raw" / f"part_{part}"
        raw.mkdir(parents=True)
        name = f"part-{part:05d}.{fmt}"
        (frame.to_parquet if fmt == "parquet" else frame.to_csv)(raw / name, index=False)
        (raw / "fetch.json").write_text(json.dumps({"file": name}))
    values = np.concatenate(every)
    valued = -np.sort(-values[~np.isnan(values)])
    for fraction in (0.1, 0.3, 0.5, 0.9):
        index = min(int(len(values) * fraction), len(valued) - 1)
        assert source_top_fraction_threshold(cfg, "similarity", fraction) == valued[index]
