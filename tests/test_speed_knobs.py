"""Knobs that only change speed or memory (recipe.schema.SPEED_KNOBS) rerun nothing: dvc.yaml
tracks every other key of the sections a stage reads, no fingerprint hashes them, and `card`
depends on exactly what it prints (not the engine)."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import yaml

from laionbuild.recipe.schema import SPEED_KNOBS, UNTRACKED_SECTIONS, Config

from .conftest import FAST, ROOT, new_project
from .conftest import S3_BUCKET as BUCKET
from .shared_demo import RECIPE, copy_of, shared_demo

# The sections (or keys) each stage reads. dvc.yaml must track all their keys but the speed knobs,
# so a result-changing key added to one of these sections later cannot go untracked.
STAGE_READS = {
    "inputs": [],  # reads source, subset, embed, tag but tracks none: it runs on every build (always_changed)
    "consolidate": ["source"],
    "fetch": ["source.base_url", "source.part_pattern", "source.files", "source.image_embeddings"],
    "prepare": ["source", "prepare"],
    "dedup": ["subset", "dedup"],
    "download": ["download"],
    "screen": ["select.image_blocklists"],
    "faces": ["tag.faces"],
    "watermark": ["tag.watermark"],
    "embed": ["embed", "source.image_embeddings_model"],
    "tag": ["tag.clip_similarity", "tag.clip_similarity_model", "tag.faces", "tag.watermark", "tag.heads",
            "tag.near_dup", "tag.source_columns", "tag.unsafe_keywords"],  # tag.clusters is the clusters stage's
    "neardup": ["subset", "tag.near_dup"],
    "clusters": ["subset", "tag.clusters"],
    "select": ["subset", "select", "source.columns", "source.column_aliases", "source.format",
               "source.consolidate_parts"],  # top_fraction_of=source reads the source parts
    "assemble": ["subset", "assemble"],
    "export": ["subset", "export"],
    "index": ["subset", "index"],  # subset: an unmaterialised build's index covers every part's embeddings
    "report": ["recipe", "subset", "source", "prepare", "dedup", "select", "index.model", "index.report_queries",
               "index.report_seed"],  # index.*: the index measured under the selection filter
    "card": [f.name for f in dataclasses.fields(Config) if f.name not in UNTRACKED_SECTIONS],  # it prints the recipe
}

# A value other than the demo build's for every speed knob
CHANGED = {
    "source.fetch_retries": "2", "source.fetch_backoff_s": "0.5", "dedup.memory_limit": "2GB",
    "dedup.bucket_rows": "1000", "download.processes_count": "2", "download.thread_count": "4",
    "embed.batch_size": "8", "embed.num_prepro_workers": "1", "embed.device": "cpu", "tag.faces.processes": "1",
    "tag.watermark.batch_size": "8", "tag.watermark.device": "cpu", "tag.watermark.decode_threads": "1",
    "index.nb_cores": "1",
}


def _type_at(path: str) -> typing.Any:
    tp: typing.Any = Config
    for name in path.split("."):
        tp = typing.get_type_hints(tp)[name]
    return tp


def leaves(path: str) -> set[str]:
    """The keys at or under `path` that DVC sees as values (a section expands to its keys; a
    mapping or list is one value)."""
    tp = _type_at(path)
    if not dataclasses.is_dataclass(tp):
        return {path}
    return set().union(*(leaves(f"{path}.{f.name}") for f in dataclasses.fields(tp)))


def test_dvc_yaml_tracks_every_key_but_the_speed_knobs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_READS), "a new stage: say in STAGE_READS which sections it reads"
    assert all("." in k and leaves(k) == {k} for k in SPEED_KNOBS), "speed knobs are single keys of the schema"
    for name, stage in stages.items():
        params = (stage.get("do") or stage).get("params", [])
        tracked = set().union(set(), *(leaves(p) for p in params))
        expected = set().union(*(leaves(s) for s in STAGE_READS[name])) - SPEED_KNOBS
        assert not tracked & SPEED_KNOBS, f"dvc.yaml: stage {name} tracks speed knobs {sorted(tracked & SPEED_KNOBS)}"
        assert not {k for k in tracked if k.split(".")[0] in UNTRACKED_SECTIONS}, f"dvc.yaml: {name} tracks the engine"
        assert tracked == expected, (f"dvc.yaml: stage {name} misses {sorted(expected - tracked)} "
                                     f"(or tracks {sorted(tracked - expected)}, which it does not read)")
    assert "params.yaml" not in stages["card"]["deps"]  # all of it, the engine included


def test_speed_knobs_are_in_no_fingerprint(tmp_path):
    from laionbuild.recipe.schema import compose
    from laionbuild.shards.storage import prefix_fingerprint
    from laionbuild.stages.download import _fingerprint

    metadata = tmp_path / "metadata.parquet"
    metadata.write_bytes(b"the part's deduped rows")
    base = compose(["download.shards_url=s3://bucket/x"], conf_dir=ROOT / "conf")
    faster = compose(["download.shards_url=s3://bucket/x", "download.processes_count=16", "download.thread_count=256"],
                     conf_dir=ROOT / "conf")
    other = compose(["download.shards_url=s3://bucket/x", "download.image_size=64"], conf_dir=ROOT / "conf")
    for fingerprint in (_fingerprint, prefix_fingerprint):
        assert fingerprint(faster, metadata) == fingerprint(base, metadata) != fingerprint(other, metadata)


def test_speed_knobs_and_engine_rerun_nothing(tmp_path_factory):
    """After a demo build, each speed knob changed (and the engine switched) leaves every stage
    built, `card` included; a build with all of them at once runs and restores nothing."""
    assert set(CHANGED) == SPEED_KNOBS, "give every speed knob a changed value"
    shared, _ = shared_demo(tmp_path_factory)
    project = copy_of(shared, tmp_path_factory.mktemp("speed") / "project")
    base = [*FAST, *RECIPE]
    for override in [*(f"{k}={v}" for k, v in CHANGED.items()), "engine=spark", "engine.write_threads=2"]:
        project.laionbuild("compose", *base, override)
        status = project.status()
        assert status and set(status.values()) == {"built"}, f"{override}: {status}"
    everything = [f"{k}={v}" for k, v in CHANGED.items()] + ["engine=spark", "engine.write_threads=2"]
    result = project.laionbuild("build", *base, *everything)
    assert result.ran == [] and result.restored == [], result.output[-3000:]


def test_speed_knobs_write_no_new_shards_prefix(s3, tmp_path):
    """With download.shards_url, a rebuild with other speed knobs runs nothing, and a forced
    download (a lost workspace, another clone) takes the complete prefix as it is."""
    fs, _ = s3
    project = new_project(tmp_path / "project")
    url = f"s3://{BUCKET}/speed"
    common = [*FAST, "subset.parts=[0]", f"download.shards_url={url}"]
    faster = ["download.processes_count=2", "download.thread_count=4"]

    def build(*args: str):
        return project.laionbuild("build", "--stage", "download@0", *common, *args)

    def prefixes() -> set[str]:
        fs.invalidate_cache()
        return {p.split("/")[2] for p in fs.find(f"{BUCKET}/speed")}

    def in_use() -> str:
        return json.loads(Path(project / "data/images/part_0/shards.json").read_text())["url"]

    assert "download@0" in build().ran
    first, stored = in_use(), prefixes()
    assert len(stored) == 1
    assert build(*faster).ran == []
    forced = build("--force", *faster)
    assert "download@0" in forced.ran and in_use() == first and prefixes() == stored
