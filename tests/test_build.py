"""The demo recipe end to end on real DVC, img2dataset over loopback HTTP, clip-retrieval and
autofaiss; then what DVC reruns for each kind of change.

The tests in this module share one built project (a copy of the session's shared demo build) and
run in file order: each step starts from the state the previous one left."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from laionbuild.project.files import numbered
from laionbuild.recipe.schema import SPEED_KNOBS, without_speed_knobs

from .conftest import FAST
from .shared_demo import EXTRA, RECIPE, copy_of, shared_demo

PER_PART = ("fetch", "prepare", "download", "screen", "faces", "watermark", "embed", "tag")
GLOBAL = ["select", "assemble", "export", "index", "report", "card"]  # after the tags; `dedup` runs before download


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    shared, result = shared_demo(tmp_path_factory)
    assert sorted(result.ran) == sorted([f"{s}@{p}" for s in PER_PART for p in (0, 1)] + ["consolidate", "dedup", "neardup",
                                                                                          "clusters"] + GLOBAL)
    return copy_of(shared, tmp_path_factory.mktemp("demo") / "project")


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def read_dataset(root: Path) -> list[dict]:
    samples = []
    for shard in sorted((root / "data" / "dataset").glob("*.tar")):
        with tarfile.open(shard) as tar:
            files: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                stem, _, ext = member.name.partition(".")
                files.setdefault(stem, {})[ext] = tar.extractfile(member).read()
        for key, entry in files.items():
            assert set(entry) == {"jpg", "txt", "json"}, f"{shard}: sample {key} has {sorted(entry)}"
            meta = json.loads(entry["json"])
            assert meta["key"] == key and meta["caption"] == entry["txt"].decode()
            samples.append({**meta, "shard": shard.name, "jpg": entry["jpg"]})
    return samples


def test_outputs_users_rely_on(built):
    samples = read_dataset(built.path)
    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys)) > 0
    assert all(s["jpg"][:2] == b"\xff\xd8" for s in samples)  # real JPEGs from img2dataset
    assert all(s["url"].startswith("http://demo.laionbuild.invalid/") for s in samples)
    assert all("clip_similarity" in s["tags"] and s["tags"]["width"] > 0 for s in samples)
    shard_meta = pd.concat([pd.read_parquet(p) for p in sorted((built / "data/dataset").glob("*.parquet"))])
    assert shard_meta["key"].tolist() == keys

    selected = pq.read_table(built / "data/selected/selected.parquet").to_pandas()
    assert selected["key"].tolist() == keys

    emb_dir = built / "data/embeddings"
    img = np.load(emb_dir / "img_emb/img_emb_000000.npy")
    text = np.load(emb_dir / "text_emb/text_emb_000000.npy")
    meta = pd.read_parquet(emb_dir / "metadata/metadata_000000.parquet")
    assert img.shape == text.shape == (len(keys), 32)  # laionbuild-tiny's embed_dim
    assert meta["key"].tolist() == keys

    # rows are the part's own embeddings, realigned to dataset order
    part0 = pd.read_parquet(built / "data/embed/part_0/metadata/metadata_0.parquet")
    part0_img = np.load(built / "data/embed/part_0/img_emb/img_emb_0.npy")
    row = {k: i for i, k in enumerate(part0["laionbuild_key"])}
    for i, key in enumerate(keys):
        if key in row:
            np.testing.assert_array_equal(img[i], part0_img[row[key]])

    index = faiss.read_index(str(built / "data/index/image.index"))
    assert index.ntotal == len(keys)
    assert json.loads((built / "data/index/image_infos.json").read_text())["nb vectors"] == len(keys)
    _, nearest = index.search(img[:5].astype("float32"), 1)
    assert nearest[:, 0].tolist() == list(range(5))


def test_index_report_is_measured_against_exact_search(built):
    report = json.loads((built / "data/metrics/index.json").read_text())
    img = np.load(built / "data/embeddings/img_emb/img_emb_000000.npy").astype("float32")
    text = np.load(built / "data/embeddings/text_emb/text_emb_000000.npy").astype("float32")
    assert report["vectors"] == len(img) and report["queries"] == len(text)  # fewer than 1000: all of them
    assert report["size_bytes"] == (built / "data/index/image.index").stat().st_size
    exact = faiss.IndexFlatIP(img.shape[1])
    exact.add(img)
    _, truth = exact.search(text, 10)
    _, found = faiss.read_index(str(built / "data/index/image.index")).search(text, 10)
    assert report["recall_at_1"] == pytest.approx(float(np.mean(found[:, 0] == truth[:, 0])))
    assert report["recall_at_10"] == pytest.approx(float(np.mean([len(set(f) & set(t)) / 10
                                                                   for f, t in zip(found, truth)])))
    assert 0 < report["latency_ms_p50"] <= report["latency_ms_p99"]
    metrics = json.loads(built.dvc("metrics", "show", "--json").output)
    assert "recall_at_10" in json.dumps(metrics)  # registered as DVC metrics


def test_clip_similarity_tag_is_the_cosine_of_the_embeddings(built):
    tags = pd.read_parquet(built / "data/tags/part_1/tags.parquet")
    img = np.load(built / "data/embed/part_1/img_emb/img_emb_0.npy").astype(np.float64)
    text = np.load(built / "data/embed/part_1/text_emb/text_emb_0.npy").astype(np.float64)
    expected = (img * text).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(text, axis=1)
    np.testing.assert_allclose(tags["clip_similarity"], expected, atol=1e-5)


def test_untrained_weights_are_labelled(built):
    model = json.loads((built / "data/embed/part_0/model.json").read_text())
    assert model["untrained"] is True and "UNTRAINED" in model["warning"]
    assert json.loads((built / "data/metrics/funnel.json").read_text())["untrained_embeddings"] is True


def test_dataset_card(built):
    card = json.loads((built / "data/card.json").read_text())
    # the composed recipe but what changes no output (and would rerun the card for nothing)
    assert card["recipe"] == without_speed_knobs(yaml.safe_load((built / "params.yaml").read_text()))
    assert "engine" not in card["recipe"] and "thread_count" not in card["recipe"]["download"]
    head = built.run("git", "rev-parse", "HEAD").output.strip()
    assert card["git"]["commit"] == head
    for source in card["sources"]:  # source files with their hashes
        data = (built / source["url"]).read_bytes() if not Path(source["url"]).is_absolute() else \
            Path(source["url"]).read_bytes()
        assert source["md5"] == hashlib.md5(data).hexdigest() and source["size"] == len(data)
    assert [s["part"] for s in card["sources"]] == [0, 1]
    funnel = json.loads((built / "data/metrics/funnel.json").read_text())
    assert card["samples"] == funnel["selected"] > 0
    assert sum(card["licences"].values()) == card["samples"]
    assert card["tools"]["img2dataset"] == "1.47.0" and card["tools"]["clip-retrieval"] == "2.45.0"
    assert card["untrained_weights"] is True and card["models"]["embed.model"]["architecture"] == "laionbuild-tiny"
    md = (built / "data/card.md").read_text()
    assert "UNTRAINED" in md and head in md and "## Reproduce" in md and f"samples: **{card['samples']}**" in md


def test_funnel_accounts_for_every_row(built):
    funnel = json.loads((built / "data/metrics/funnel.json").read_text())
    raw_rows = sum(pq.read_metadata(p).num_rows for p in (built / "data/raw").glob("part_*/*.parquet"))
    assert funnel["rows_in"] == raw_rows
    assert (funnel["rows_in"] >= funnel["after_has_url"] >= funnel["after_nsfw"] >= funnel["after_max_aspect_ratio"]
            > funnel["after_dedup"])
    assert funnel["after_dedup"] == funnel["download_attempted"]
    assert funnel["downloaded_ok"] + funnel["download_failed"] == funnel["download_attempted"]
    assert sum(funnel["download_failed_by_reason"].values()) == funnel["download_failed"]
    assert any("404" in reason for reason in funnel["download_failed_by_reason"])
    assert funnel["embedded"] == funnel["tagged"] == funnel["downloaded_ok"]
    assert funnel["tagged"] >= funnel["after_min_clip_similarity"] == funnel["selected"] == funnel["indexed"]
    assert funnel["selected"] == len(read_dataset(built.path))
    assert set(funnel["parts"]) == {"0", "1"}
    # the same funnel computed independently with pandas from the raw parts
    raw = pd.concat([pd.read_parquet(built / f"data/raw/part_{p}/part-{p:05d}.parquet") for p in (0, 1)])
    not_nsfw = raw[raw["NSFW"].isna() | (raw["NSFW"] != "NSFW")]
    assert funnel["after_nsfw"] == len(not_nsfw)
    short, long = not_nsfw[["WIDTH", "HEIGHT"]].min(axis=1), not_nsfw[["WIDTH", "HEIGHT"]].max(axis=1)
    kept = not_nsfw[(short > 0) & (long <= 3.5 * short)]  # the shared demo's prepare.max_aspect_ratio=3.5
    assert funnel["after_max_aspect_ratio"] == len(kept)
    assert funnel["after_dedup"] == len(kept.drop_duplicates(["URL", "TEXT"])) < len(kept)
    # DVC knows it as a metric
    metrics = built.dvc("metrics", "show", "--json").output
    assert '"selected"' in metrics


def test_second_repro_runs_no_stage(built):
    result = built.dvc("repro")
    assert result.ran == [] and result.restored == []
    status = built.status()
    assert set(status.values()) == {"built"} and "select" in status and "download@1" in status


def test_status_shows_stale_stages_after_a_change(built):
    built.laionbuild("compose", *FAST, *RECIPE, "select.min_clip_similarity=0.5")
    rows = built.status()
    assert len(rows) == len(PER_PART) * 2 + len(["consolidate", "dedup", "neardup", "clusters"]) + len(GLOBAL)
    assert rows["select"] == "stale"
    assert rows["download@0"] == "built" and rows["tag@1"] == "built"


def test_threshold_change_reruns_only_select_and_after(built):
    before = read_dataset(built.path)
    sims = sorted(s["tags"]["clip_similarity"] for s in before)
    threshold = sims[len(sims) // 2]  # keeps about half
    result = built.build(*RECIPE, f"select.min_clip_similarity={threshold!r}")
    assert result.ran == GLOBAL
    after = read_dataset(built.path)
    assert 0 < len(after) < len(before)
    assert all(s["tags"]["clip_similarity"] >= threshold - 1e-6 for s in after)
    assert faiss.read_index(str(built / "data/index/image.index")).ntotal == len(after)


def test_adding_a_part_runs_only_that_part_and_global_stages(built):
    base = RECIPE
    built.build(*base)  # back to the default threshold (restored from the run-cache)
    digests = {d: tree_digest(built / "data" / d) for d in ("dataset", "embeddings", "index", "selected")}
    funnel = (built / "data/metrics/funnel.json").read_text()

    added = built.build("subset.parts=[0,1,2]", *EXTRA)
    assert sorted(added.ran) == sorted([f"{s}@2" for s in PER_PART] + ["dedup", "neardup", "clusters"] + GLOBAL)
    assert set(json.loads((built / "data/metrics/funnel.json").read_text())["parts"]) == {"0", "1", "2"}

    removed = built.build(*base)
    # only the dataset card is rewritten (its outputs are `cache: false`, kept in git, and it records
    # the git commit, which DVC does not see): nothing is recomputed
    assert removed.executed in ([], ["card"])
    assert set(GLOBAL + ["dedup", "neardup", "clusters"]) - {"card"} <= set(removed.restored)
    assert {d: tree_digest(built / "data" / d) for d in digests} == digests
    assert (built / "data/metrics/funnel.json").read_text() == funnel
    assert not (built / "data/images/part_2").exists()
    assert not (built / "data/.kept").exists()  # every stage's part 2 output was in DVC's cache: removed, none kept


def test_params_yaml_is_what_dvc_tracks(built):
    params = yaml.safe_load((built / "params.yaml").read_text())
    assert params["subset"]["parts"] == [0, 1]
    lock = yaml.safe_load((built / "dvc.lock").read_text())["stages"]
    assert set(lock["select"]["params"]["params.yaml"]) == {"subset", "select", "source.columns", "source.column_aliases",
                                                           "source.format", "source.consolidate_parts"}
    # download: every key of its section but the speed knobs (recipe.schema.SPEED_KNOBS), with
    # the values params.yaml holds
    tracked = lock["download@0"]["params"]["params.yaml"]
    expected = {f"download.{k}": v for k, v in params["download"].items()
                if f"download.{k}" not in SPEED_KNOBS and not isinstance(v, dict)}
    assert {k: v for k, v in tracked.items() if k in expected} == expected
    assert all(k.startswith("download.") for k in tracked) and not SPEED_KNOBS & set(tracked)


def test_query_by_image_and_text(built, tmp_path):
    samples = read_dataset(built.path)
    first = samples[0]
    with tarfile.open(sorted((built / "data/dataset").glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(first["key"] + ".") and not
                      m.name.endswith((".json", ".txt")))
        (tmp_path / "query.jpg").write_bytes(tar.extractfile(member).read())
    found = _json_tail(built.laionbuild("query", "--image", str(tmp_path / "query.jpg"), "-k", "3", "--json").output)
    assert found[0]["key"] == first["key"] and found[0]["score"] > 0.99  # its own image embedding

    text = np.load(built / "data/embeddings/text_emb/text_emb_000000.npy").astype("float32")
    keys = pd.concat([pd.read_parquet(p) for p in sorted((built / "data/embeddings/metadata").glob("*.parquet"))])["key"].tolist()
    i = keys.index(first["key"])
    out = built.laionbuild("query", "--text", first["caption"], "-k", "5", "--json").output
    got = _json_tail(out)
    scores, rows = faiss.read_index(str(built / "data/index/image.index")).search(text[i:i + 1], 5)
    assert [r["key"] for r in got] == [keys[r] for r in rows[0]]
    assert [r["score"] for r in got] == pytest.approx(scores[0].tolist(), abs=1e-4)
    plain = built.laionbuild("query", "--text", first["caption"], "-k", "2").output.strip().splitlines()[-2:]
    assert [line.split("\t")[1] for line in plain] == [r["url"] for r in got[:2]]


def _json_tail(output: str):
    """The JSON document at the end of a command's output (logs may come before it)."""
    start = output.rindex("\n[") + 1 if "\n[" in output else output.index("[")
    return json.loads(output[start:])


def test_index_ids_are_dataset_rows_past_ten_embedding_files(built, tmp_path):
    """autofaiss and clip-retrieval back read data/embeddings' files in name order, laionbuild's
    readers in row order: with three rows per file (the demo then has over ten files) the two
    must agree, or an index id names another sample (img_emb_10 sorts before img_emb_2)."""
    built.build(*RECIPE, "assemble.embeddings_per_file=3")
    files = sorted((built / "data/embeddings/img_emb").glob("*.npy"))
    assert len(files) > 10
    samples = read_dataset(built.path)
    keys = pd.concat([pd.read_parquet(p) for p in sorted((built / "data/embeddings/metadata").glob("*.parquet"))])
    assert keys["key"].tolist() == [s["key"] for s in samples]  # name order is dataset order
    index = faiss.read_index(str(built / "data/index/image.index"))
    img = np.concatenate([np.load(p) for p in numbered(files[0].parent, "img_emb", ".npy")]).astype("float32")  # row order
    assert index.ntotal == len(samples)
    scores, rows = index.search(img, 1)
    # each row's hit is itself or a near-identical image's row (float16 embeddings: ties broken by rounding)
    assert (scores[:, 0] >= (img * img).sum(axis=1) - 1e-3).all()
    np.testing.assert_allclose(img[rows[:, 0]], img, atol=1e-2)
    last = samples[-1]  # a sample in the last file
    with tarfile.open(sorted((built / "data/dataset").glob("*.tar"))[-1]) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(last["key"] + ".") and m.name.endswith(".jpg"))
        (tmp_path / "query.jpg").write_bytes(tar.extractfile(member).read())
    found = _json_tail(built.laionbuild("query", "--image", str(tmp_path / "query.jpg"), "-k", "1", "--json").output)
    assert found[0]["key"] == last["key"] and found[0]["score"] > 0.99
    metrics = json.loads((built / "data/metrics/index.json").read_text())
    assert metrics["recall_at_1"] > 0.9  # the report's exact search numbers rows as the index does


def test_a_dvc_yaml_of_an_old_output_layout_is_refused_and_rebuilds_what_changed(built):
    """assemble's output layout (six-digit embedding file numbers) is in its dvc.yaml cmd
    (`--layout 2`): DVC sees an old project's assemble as changed, its run-cache cannot restore
    the old layout, and a dvc.yaml with the old cmd is refused, naming the line to take, by the
    stage and by `build` and `status` (a dataset repo keeps its dvc.yaml across upgrades)."""
    from laionbuild.project.layout import OUTPUT_LAYOUTS

    shipped = (built / "dvc.yaml").read_text()
    new_cmd = f"cmd: laionbuild stage assemble --layout {OUTPUT_LAYOUTS['assemble']}"
    assert new_cmd in shipped
    (built / "dvc.yaml").write_text(shipped.replace(new_cmd, "cmd: laionbuild stage assemble"))
    try:
        assert "changed command" in built.dvc("status", "assemble").output
        line = f"`cmd: laionbuild stage assemble --layout {OUTPUT_LAYOUTS['assemble']}`"
        # the stage itself, and build and status before DVC runs anything (an up-to-date assemble
        # of the old layout would never run to refuse it)
        for refused in (built.laionbuild("stage", "assemble", check=False), built.build(*RECIPE, check=False),
                        built.laionbuild("status", check=False)):
            assert refused.returncode == 2 and line in refused.output and "Running stage" not in refused.output, \
                refused.output[-2000:]
    finally:
        (built / "dvc.yaml").write_text(shipped)
    assert "changed command" not in built.dvc("status", "assemble").output
