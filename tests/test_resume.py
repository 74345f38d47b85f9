"""Killing the build during download and running it again gives the same selected samples as
an uninterrupted build, with no duplicate keys and without re-downloading finished shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from .conftest import BIN, FAST, Project, build_env, new_project
from .imageserver import ImageServer, source_overrides, write_source
from .test_build import read_dataset

ROWS, PER_SHARD = 60, 6


def test_kill_during_download_then_resume(tmp_path):
    """Shards in the workspace, then under download.shards_url (a file:// folder outside the
    project, as a shared mount): the killed download resumes in the same prefix."""
    with ImageServer(delay=0.05) as server:
        source = tmp_path / "source"
        write_source(source, server.url, ROWS, missing_every=10)
        overrides = [*source_overrides(source), f"download.number_sample_per_shard={PER_SHARD}",
                     "download.thread_count=2", "select.min_clip_similarity=null"]

        reference = new_project(tmp_path / "reference", cache="own")
        reference.build(*overrides, "--stage", "select")  # (its selection is all we compare)
        expected = pq.read_table(reference / "data/selected/selected.parquet")["key"].to_pylist()

        _kill_and_resume(tmp_path / "killed", server, overrides, expected,
                         lambda project: list((project / "data/.work/download").glob("part_0-*/shards/*_stats.json")))
        shared = tmp_path / "shared"
        # (with face tags: faces reads the shards there too)
        _kill_and_resume(tmp_path / "killed_shared", server, [*overrides, f"download.shards_url=file://{shared}",
                                                              "tag.faces.detector=opencv_haar"],
                         expected, lambda project: list(shared.glob("part_0-*/*_stats.json")))
        assert len(list(shared.glob("part_0-*"))) == 1  # resumed where it stopped, not in a new prefix


def _kill_and_resume(path, server, overrides, expected, stats_files: Callable[[Project], list[Path]]) -> None:
    """Kill the build once two shards of part 0 are done (`stats_files`: img2dataset's finished
    shards), build again: the expected selection, finished shards not downloaded again."""
    server.requests.clear()
    project = new_project(path, cache="own")  # (killed: nothing restored from another test)
    process = subprocess.Popen([str(BIN / "laionbuild"), "build", *FAST, *overrides], cwd=project.path,
                               env=build_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    done = []
    while time.time() < deadline and process.poll() is None:
        done = stats_files(project)
        if len(done) >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the build finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_shards = {int(p.name.split("_")[0]) for p in stats_files(project)}
    assert len(finished_shards) >= 2
    assert not (project / "data/images/part_0").exists()  # no half output that looks complete

    project.build(*overrides)
    got = pq.read_table(project / "data/selected/selected.parquet")["key"].to_pylist()
    assert got == expected
    keys = [s["key"] for s in read_dataset(project.path)]
    assert keys == expected and len(set(keys)) == len(keys)

    # URLs of shards finished before the kill were not downloaded again
    for shard in finished_shards:
        for row in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
            path = f"/missing/{row}.jpg" if row % 10 == 0 else f"/img/{row}.jpg"
            assert server.requests[path] == 1, (shard, path, server.requests[path])
    funnel = json.loads((project / "data/metrics/funnel.json").read_text())
    assert funnel["downloaded_ok"] == ROWS - ROWS // 10
    assert not list((project / "data/.work/download").glob("*"))  # scratch cleaned up


def _shard_keys(project) -> dict[str, list[str]]:
    """shard -> sorted sample keys (our key) of its successes, every tar read to the end."""
    import tarfile

    out = {}
    for path in sorted((project / "data/images/part_0").glob("*.tar")):
        with tarfile.open(path) as tar:
            out[path.name] = sorted(json.loads(tar.extractfile(m).read())["laionbuild_key"]
                                    for m in tar.getmembers() if m.name.endswith(".json"))
    return out


def test_download_stage_killed_at_random_points(tmp_path):
    import random

    with ImageServer(delay=0.02) as server:
        source = tmp_path / "source"
        write_source(source, server.url, ROWS, missing_every=10)
        project = new_project(tmp_path / "project", cache="own")
        project.build(*source_overrides(source), f"download.number_sample_per_shard={PER_SHARD}",
                      "download.thread_count=2", "--stage", "download")
        reference = _shard_keys(project)
        reference_stats = json.loads((project / "data/images/part_0/stats.json").read_text())
        rng = random.Random(7)
        for _ in range(3):
            os.rename(project / "data/images/part_0", tmp_path / f"old_{rng.random()}")
            process = subprocess.Popen([str(BIN / "laionbuild"), "stage", "download", "--part", "0"],
                                       cwd=project.path, env=build_env(), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(rng.uniform(0.5, 5.0))
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if process.returncode != 0:
                assert not (project / "data/images/part_0").exists()  # nothing half-done in place
                project.laionbuild("stage", "download", "--part", "0")
            got = _shard_keys(project)
            assert got == reference
            assert json.loads((project / "data/images/part_0/stats.json").read_text()) == reference_stats
