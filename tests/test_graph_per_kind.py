"""The per-kind stage graph (`laionbuild init --graph per-kind`, `laionbuild graph per-kind`;
laionbuild/project/partwise.py, issue #21): one DVC stage per kind of per-part work, each over
every part, skipping the parts whose marker matches their inputs and params. It builds exactly
what the per-part graph builds, reruns only the parts a change touches, resumes a killed kind at
the part it was on, and keeps `laionbuild status`, sweeps and `dvc exp show` working. Real DVC
repos, the embeddings-only recipe (no images, no model: seconds a build)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from .conftest import Project, new_project
from .test_embeddings_only import write_laion2b_part

PER_PART = ("fetch", "prepare", "download", "screen", "faces", "watermark", "embed", "tag")
# what differs between two builds of one recipe: the git commit the card names, autofaiss's
# timings, the index's measured latency
UNSTABLE = {"card.md", "card.json", "index/image_infos.json", "metrics/index.json"}


def recipe(source: Path, parts: list[int]) -> list[str]:
    return ["recipe=laion2b_en_emb", f"source.base_url={source}", "source.num_parts=5",
            f"subset.parts=[{','.join(map(str, parts))}]", "index.index_key=Flat"]


def outputs(project: Project) -> dict[str, str]:
    """Every built file under data/ (not scratch, not markers) -> md5."""
    root = project / "data"
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel.split("/")[0] in (".work", ".tmp", ".kept") or path.name == ".laionbuild-part.json":
            continue  # (scratch, and the per-kind graph's part markers)
        if path.name == "parts.json" and rel.count("/") == 1 and rel != "deduped/parts.json":
            continue  # (the per-kind graph's manifests of the per-part folders; dedup writes its own in both)
        if rel not in UNSTABLE:
            found[rel] = hashlib.md5(path.read_bytes()).hexdigest()
    return found


def per_kind_project(path: Path) -> Project:
    project = new_project(path)
    project.laionbuild("graph", "per-kind")
    project.run("git", "commit", "-qam", "per-kind graph")
    return project


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "laion2B-en"
    for part in range(4):
        write_laion2b_part(root, part, 30, rng)
    return root


def test_the_per_kind_graph_builds_what_the_per_part_graph_builds(tmp_path, source):
    per_part, per_kind = new_project(tmp_path / "per_part"), per_kind_project(tmp_path / "per_kind")
    graph = yaml.safe_load((per_kind / "dvc.yaml").read_text())["stages"]
    assert all("foreach" not in graph[s] and graph[s]["cmd"] == f"laionbuild stage {s} --all-parts" for s in PER_PART)
    per_part.build(*recipe(source, [0, 1, 2]))
    built = per_kind.build(*recipe(source, [0, 1, 2]))
    assert sorted(built.ran) == sorted([f"{s}@{p}" for s in PER_PART for p in (0, 1, 2)] + [
        "consolidate", "dedup", "neardup", "clusters", "select", "assemble", "export", "index", "report", "card"])
    assert outputs(per_kind) == outputs(per_part) and len(outputs(per_kind)) > 40
    lock = yaml.safe_load((per_kind / "dvc.lock").read_text())["stages"]
    assert not [name for name in lock if "@" in name]  # one entry a kind, not a part
    assert per_kind.build(*recipe(source, [0, 1, 2])).ran == []  # a no-op rebuild runs nothing
    # a built per-part project switched to the per-kind graph adopts its parts: none reruns
    switched = per_part.laionbuild("graph", "per-kind")
    assert "fetch 3/3" in switched.output and "tag 3/3" in switched.output, switched.output
    rebuilt = per_part.build(*recipe(source, [0, 1, 2]))
    assert [n for n in rebuilt.ran if "@" in n] == [] and "select" in rebuilt.ran, rebuilt.ran
    assert outputs(per_part) == outputs(per_kind)
    # every part has its marker, naming what its fingerprint is made of
    marker = json.loads((per_kind / "data/tags/part_1/.laionbuild-part.json").read_text())
    assert marker["deps"]["data/embed/part_1"].startswith("part:") and "tag.clip_similarity" in marker["params"]


def test_a_change_reruns_only_the_parts_it_touches(tmp_path, source):
    project = per_kind_project(tmp_path / "project")
    project.build(*recipe(source, [0, 1, 2]))
    touched = lambda result: sorted(n for n in result.ran if "@" in n)  # noqa: E731

    # a new part: its own per-part work, and the global stages
    added = project.build(*recipe(source, [0, 1, 2, 3]))
    assert touched(added) == sorted(f"{s}@3" for s in PER_PART), added.ran
    assert {"dedup", "select", "assemble", "index"} <= set(added.ran)
    assert "laionbuild: fetch: 1 part(s) run, 3 up to date" in added.output

    # one part's source file edited: status names it before any build, the build reruns that
    # part's stages whose inputs changed (the captions: prepare's output, hence what follows)
    meta = source / "laion2B-en-metadata" / "metadata_0001.parquet"
    table = pq.read_table(meta)
    table = table.set_column(table.schema.get_field_index("caption"), "caption",
                             pa.array([c + " (edited)" for c in table.column("caption").to_pylist()]))
    pq.write_table(table, meta)
    assert project.status_reasons()["fetch@1"] == ("stale", f"file: {meta}")
    assert project.status()["fetch@0"] == "built"
    # (from here, up to select: what follows it was checked by `added`)
    edited = project.build(*recipe(source, [0, 1, 2, 3]), "--stage", "select")
    assert touched(edited) == sorted(f"{s}@1" for s in PER_PART), edited.ran
    captions = [c for f in sorted((project / "data/deduped/part_1").glob("*.parquet"))
                for c in pq.read_table(f, columns=["caption"]).column(0).to_pylist()]
    assert captions and all(c.endswith(" (edited)") for c in captions)

    # a param of one kind: every part of that kind reruns, status names the key
    project.laionbuild("compose", *recipe(source, [0, 1, 2, 3]), "prepare.max_aspect_ratio=3.0")
    reasons = project.status_reasons()
    assert all(reasons[f"prepare@{p}"] == ("stale", "params: prepare.max_aspect_ratio") for p in range(4))
    assert reasons["fetch@0"][0] == "built"
    changed = project.build(*recipe(source, [0, 1, 2, 3]), "prepare.max_aspect_ratio=3.0", "--stage", "select")
    assert {f"prepare@{p}" for p in range(4)} <= set(changed.ran) and not any(n.startswith("fetch@") for n in changed.ran)

    # a new order of the parts: no part reruns, dedup does (the first occurrence in part order wins)
    reordered = project.build(*recipe(source, [3, 2, 1, 0]), "prepare.max_aspect_ratio=3.0", "--stage", "select")
    assert touched(reordered) == [] and {"dedup", "select"} <= set(reordered.ran), reordered.ran

    # a part's output deleted: that part reruns, and what reads it (its bytes may differ)
    shutil.rmtree(project / "data/embed/part_2")
    redone = project.build(*recipe(source, [3, 2, 1, 0]), "prepare.max_aspect_ratio=3.0", "--stage", "select")
    assert touched(redone) == ["embed@2", "tag@2"], redone.ran

    # a dropped part leaves the kind's folder (kept, not lost), and nothing else reruns
    dropped = project.build(*recipe(source, [0, 1, 2]), "prepare.max_aspect_ratio=3.0", "--stage", "select")
    assert touched(dropped) == [], dropped.ran
    assert not (project / "data/raw/part_3").exists()
    status = project.status()
    assert [status[f"{s}@{p}"] for s in PER_PART for p in (0, 1, 2)] == ["built"] * 24 and "fetch@3" not in status


def test_a_kind_killed_between_parts_resumes_at_the_part_it_was_on(tmp_path, source):
    from laionbuild.project.partwise import changed_in_place, run_parts
    from laionbuild.recipe.schema import load_params
    from laionbuild.stages import tag

    project = per_kind_project(tmp_path / "project")
    project.build(*recipe(source, [0, 1, 2]))
    before = {p: (project / f"data/tags/part_{p}/tags.parquet").read_bytes() for p in (0, 1, 2)}
    for p in (0, 1, 2):  # as after a change to what every tag part reads
        (project / f"data/tags/part_{p}/.laionbuild-part.json").unlink()
    old = os.getcwd()
    os.chdir(project.path)
    try:
        cfg = load_params("params.yaml")

        def killed_at_part_1(part: int) -> None:
            if part == 1:
                raise KeyboardInterrupt
            tag.run(cfg, part)

        with pytest.raises(KeyboardInterrupt):
            run_parts("tag", [0, 1, 2], killed_at_part_1)
        assert (project / "data/tags/part_0/.laionbuild-part.json").exists()
        assert not (project / "data/tags/part_1/.laionbuild-part.json").exists()
        ran, skipped = run_parts("tag", [0, 1, 2], lambda part: tag.run(cfg, part))
    finally:
        os.chdir(old)
    assert (ran, skipped) == ([1, 2], [0])
    assert {p: (project / f"data/tags/part_{p}/tags.parquet").read_bytes() for p in (0, 1, 2)} == before
    # an output changed in place after its stage ran (retry-failed merging recovered images into
    # a download part): the part stays built, what reads it sees a new input and reruns
    os.chdir(project.path)
    try:
        changed_in_place("embed", 2, "recovered samples")
        assert run_parts("tag", [0, 1, 2], lambda part: tag.run(cfg, part)) == ([2], [0, 1])
        assert run_parts("embed", [0, 1, 2], lambda part: pytest.fail(f"embed@{part} ran")) == ([], [0, 1, 2])
    finally:
        os.chdir(old)


def test_a_sweep_on_the_per_kind_graph_runs_no_part_again(tmp_path, source):
    project = per_kind_project(tmp_path / "project")
    base = recipe(source, [0, 1])
    project.build(*base)
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "built")
    swept = project.build("-m", *base, "+select.top_fraction.width=0.3,0.8")
    assert "running part stage" not in swept.output, swept.output[-3000:]
    shown = json.loads(project.dvc("exp", "show", "--json").output)
    experiments = [e for entry in shown for e in (entry.get("experiments") or [])]
    assert len(experiments) == 2, shown
    assert swept.ran.count("select") == 2
