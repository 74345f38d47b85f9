"""The report stage's page (`data/report/index.html`) opened in headless Chromium, and the same
data as DVC plots. The build is the shared demo (tests/shared_demo.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .browser import chromium, screenshot
from .shared_demo import shared_demo

THRESHOLD = -0.05  # the demo recipe's select.min_clip_similarity


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return shared_demo(tmp_path_factory)[0]


def _tags(project) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(project / f"data/tags/part_{p}/tags.parquet") for p in (0, 1)],
                     ignore_index=True)


def test_histograms_and_licences_are_dvc_plots(built):
    tags = _tags(built)
    funnel = json.loads((built / "data/metrics/funnel.json").read_text())
    selected = set(pd.read_parquet(built / "data/selected/selected.parquet")["key"])
    names = {p.stem for p in (built / "data/metrics/hist").glob("*.json")}
    assert {"clip_similarity", "width", "height", "aspect_ratio", "face_count", "face_max_score"} <= names
    for name in ("clip_similarity", "width", "height", "face_count"):
        bins = json.loads((built / f"data/metrics/hist/{name}.json").read_text())
        assert sum(b["samples"] for b in bins) == len(tags) == funnel["tagged"]
        assert sum(b["selected"] for b in bins) == len(selected) == funnel["selected"]
        assert all(b["bin"] < b["bin_end"] for b in bins)
        assert bins[0]["bin"] == pytest.approx(tags[name].min(), abs=1e-5)  # the bins span the values
        assert bins[-1]["bin_end"] >= tags[name].max() - 1e-5
    # an integer tag of small range: one bin per value, recounted from the tag table
    faces = json.loads((built / "data/metrics/hist/face_count.json").read_text())
    counts = tags["face_count"].value_counts()
    chosen = tags[tags["key"].isin(selected)]["face_count"].value_counts()
    assert [(b["bin"], b["samples"], b["selected"]) for b in faces] == [
        (n, int(counts.get(n, 0)), int(chosen.get(n, 0))) for n in range(int(tags["face_count"].max()) + 1)]
    licences = json.loads((built / "data/metrics/licences.json").read_text())
    card = json.loads((built / "data/card.json").read_text())
    assert {row["licence"]: row["samples"] for row in licences} == card["licences"]

    shown = json.loads(built.dvc("plots", "show", "--json").output)
    plotted = set(shown["data"])
    assert {"data/metrics/funnel_steps.json", "data/metrics/licences.json",
            "data/metrics/hist/clip_similarity.json", "data/metrics/hist/face_count.json"} <= plotted
    assert not shown.get("errors")
    lock = yaml.safe_load((built / "dvc.lock").read_text())["stages"]["report"]
    assert "data/report" in [out["path"] for out in lock["outs"]]  # the page is a DVC output


def test_funnel_steps_are_in_pipeline_order(built):
    steps = [s["step"] for s in json.loads((built / "data/metrics/funnel_steps.json").read_text())]
    assert steps == ["rows_in", "after_has_url", "after_nsfw", "after_max_aspect_ratio", "after_dedup",
                     "downloaded_ok", "embedded", "after_min_clip_similarity", "selected", "indexed"]


def test_report_renders_in_chromium(built):
    page = built / "data/report/index.html"
    steps = json.loads((built / "data/metrics/funnel_steps.json").read_text())
    with chromium() as browser:
        browser.get(page.as_uri())
        script = browser.execute_script
        # the funnel: one bar per step, labelled in order, as wide as its count
        bars = script("""return [...document.querySelectorAll('svg[data-chart=funnel] rect.bar')]
                         .map(r => [r.querySelector('title').textContent, r.getBBox().width])""")
        assert [title for title, _ in bars] == [f"{s['step']}: {s['rows']}" for s in steps]
        longest = max(s["rows"] for s in steps)
        assert [w for _, w in bars] == pytest.approx([360 * s["rows"] / longest for s in steps], abs=0.2)
        assert script("return document.querySelectorAll('svg[data-chart=download_failures] rect.bar').length") == 2
        for chart in ("hist_clip_similarity", "hist_width", "hist_height", "hist_aspect_ratio", "hist_face_count",
                      "licences"):
            drawn = script(f"""const s = document.querySelector('svg[data-chart={chart}]');
                               return s ? [...s.querySelectorAll('rect.bar')].filter(r => r.getBBox().height > 0
                                          || r.getBBox().width > 0).length : 0""")
            assert drawn > 0, chart
        # thumbnails: decoded images, every one inline (the page loads nothing)
        images = script("""return [...document.querySelectorAll('.filter img')].map(i =>
                           [i.closest('.filter').dataset.filter, i.closest('.grid').classList.contains('kept')
                            ? 'kept' : 'dropped', i.complete && i.naturalWidth > 0, i.src.slice(0, 23)])""")
        assert images and all(ok for _, _, ok, _ in images)
        assert {src for *_, src in images} == {"data:image/jpeg;base64,"}
        assert script("return performance.getEntriesByType('resource').length") == 0
        by_grid = {(f, kind) for f, kind, _, _ in images}
        # select rules act on downloaded samples: both sides have thumbnails
        assert {("select.min_clip_similarity", "kept"), ("select.min_clip_similarity", "dropped"),
                ("download", "kept"), ("prepare.max_aspect_ratio", "kept")} <= by_grid
        # metadata filters: dropped rows were never downloaded, so they are listed
        rows = script("""return [...document.querySelectorAll('.filter .grid.dropped tr')].map(r =>
                         [r.closest('.filter').dataset.filter, r.dataset.key, r.textContent])""")
        listed = {f for f, _, _ in rows}
        assert {"prepare.nsfw", "prepare.max_aspect_ratio", "download"} <= listed
        assert any("http 404" in text for f, _, text in rows if f == "download")
        select_notes = script("""return [...document.querySelectorAll('[data-filter="select.min_clip_similarity"] .sample')]
                                 .map(s => [s.closest('.grid').classList.contains('kept'), s.dataset.key,
                                            s.querySelector('.note').textContent])""")
        path = screenshot(browser, "report")
    assert path.stat().st_size > 50_000

    # the grids hold what the rules say: kept samples pass the threshold, dropped ones fail it
    similarity = dict(zip(_tags(built)["key"], _tags(built)["clip_similarity"]))
    assert select_notes
    for kept, key, note in select_notes:
        assert (similarity[key] >= THRESHOLD) == kept
        assert float(re.search(r"clip_similarity=(-?[\d.e-]+)", note).group(1)) == pytest.approx(similarity[key], abs=1e-3)
    raw = pd.concat([pd.read_parquet(built / f"data/raw/part_{p}/part-{p:05d}.parquet").assign(part=p) for p in (0, 1)])
    nsfw_keys = {f"{p:05d}{i:09d}" for p, i, tag in zip(raw["part"], raw.groupby("part").cumcount(), raw["NSFW"])
                 if tag == "NSFW"}
    dropped_nsfw = {key for f, key, _ in rows if f == "prepare.nsfw"}
    assert dropped_nsfw == nsfw_keys  # the demo has 4: all shown, and only them
    wide = {f"{p:05d}{i:09d}" for p, i, w, h in zip(raw["part"], raw.groupby("part").cumcount(), raw["WIDTH"],
                                                    raw["HEIGHT"]) if max(w, h) > 3.5 * min(w, h)}
    dropped_wide = {key for f, key, _ in rows if f == "prepare.max_aspect_ratio"}
    assert dropped_wide and dropped_wide <= wide


def test_report_is_one_self_contained_file(built):
    html = Path(built / "data/report/index.html").read_text()
    assert "<script" not in html and "<link" not in html and "url(" not in html
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html)  # nothing fetched from anywhere
    assert "UNTRAINED" in html  # the demo's random weights are called out
