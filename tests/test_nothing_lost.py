"""Nothing built is lost: `compose` removes a dropped part's output only when DVC's cache holds
it as it is, and two builds sharing one `download.shards_url` never write into one prefix at once
(laionbuild/shards/lease.py)."""

from __future__ import annotations

from .conftest import FAST


def _tree(path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_compose_keeps_dropped_outputs_the_cache_does_not_hold(project):
    project.build("subset.parts=[0,1]", "--stage", "prepare")  # fetch and prepare of 0 and 1, in DVC's cache
    # part 2 fetched by hand (never committed: no dvc.lock entry, nothing in the cache), and a file
    # of part 1's prepared output changed after DVC saved it
    project.laionbuild("compose", *FAST, "subset.parts=[0,1,2]")
    project.laionbuild("stage", "fetch", "--part", "2")
    raw_2 = _tree(project / "data/raw/part_2")
    (project / "data/prepared/part_1/notes.txt").write_text("edited after the build\n")
    prepared_1 = _tree(project / "data/prepared/part_1")
    assert raw_2 and "notes.txt" in prepared_1

    composed = project.laionbuild("compose", *FAST, "subset.parts=[0]")
    # the global stages' directories hold part 0 alone, as in a build that never had the others
    for directory in ("raw", "prepared"):
        assert sorted(p.name for p in (project / f"data/{directory}").iterdir()) == ["part_0"]
    # what the cache did not hold is moved aside, byte for byte, and said where
    assert _tree(project / "data/.kept/raw/part_2") == raw_2
    assert _tree(project / "data/.kept/prepared/part_1") == prepared_1
    assert "kept data/raw/part_2 in data/.kept/raw/part_2" in composed.output
    assert "kept data/prepared/part_1 in data/.kept/prepared/part_1" in composed.output
    assert "data/raw/part_1 in" not in composed.output  # removed: the cache holds it
    assert not (project / "data/.kept/raw/part_1").exists()
    # and git and DVC do not see the kept copies
    assert project.run("git", "status", "--porcelain", "--ignored", "data/.kept").output.startswith("!! data/")
    status = project.dvc("status", "fetch@0", "prepare@0").output
    assert ".kept" not in status

    # part 1 added back: its fetch comes back from the cache, nothing runs
    again = project.build("subset.parts=[0,1]", "--stage", "fetch")
    assert again.ran == [], again.ran
    assert (project / "data/raw/part_1").is_dir()
    # dropped again (now held as it is): removed, not kept a second time
    project.laionbuild("compose", *FAST, "subset.parts=[0]")
    assert not (project / "data/raw/part_1").exists() and not (project / "data/.kept/raw/part_1.1").exists()
