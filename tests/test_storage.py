"""download.shards_url: img2dataset writes the shards to an object store (here a real S3 server on
127.0.0.1, moto's); every reader (faces, embed, assemble, the report's grids) reads them back from
there, and the build gives the same dataset as the one whose shards sit in the workspace. DVC
tracks the part's manifest, not the tars. (Spark executors writing and reading them:
tests/test_spark_stages.py.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import yaml

from laionbuild.project.layout import KEY_COLUMN

from .conftest import FAST
from .conftest import S3_BUCKET as BUCKET
from .shared_demo import RECIPE, copy_of, shared_demo
from .test_spark_stages import digest, shard_samples


def _prefixes(fs, part: int) -> list[str]:
    return [p for p in fs.ls(f"{BUCKET}/local") if p.rsplit("/", 1)[-1].startswith(f"part_{part}-")]


def test_shards_on_s3_build_the_same_dataset(s3, tmp_path_factory):
    fs, _ = s3
    local, _ = shared_demo(tmp_path_factory)
    project = copy_of(local, tmp_path_factory.mktemp("s3") / "project")
    project.run("rm", "-rf", "data", ".dvc/cache")  # the same project, built again from nothing
    built = project.laionbuild("build", "--progress", *FAST, *RECIPE, f"download.shards_url=s3://{BUCKET}/local")
    # --progress counts the shards as they land in the bucket
    downloads = [re.search(r"download@(\d) · part \d/2 · (\d+) shards · (\d+) samples", line)
                 for line in built.output.splitlines() if line.startswith("[progress] ") and "· download@" in line]
    assert downloads and all(downloads)
    assert {m.group(1) for m in downloads} == {"0", "1"} and max(int(m.group(3)) for m in downloads) > 0

    for part in (0, 1):
        images = project / f"data/images/part_{part}"
        assert not list(images.glob("*.tar"))  # the tars are in the bucket, nothing else moved
        manifest = json.loads((images / "shards.json").read_text())
        [prefix] = _prefixes(fs, part)
        assert manifest["url"] == f"s3://{prefix}"
        stored = {p.rsplit("/", 1)[-1]: fs.size(p) for p in fs.ls(prefix) if p.endswith(".tar")}
        assert {s["name"]: s["size"] for s in manifest["shards"]} == stored and stored
        # img2dataset's per-shard files are kept beside the manifest, as in a local part
        assert sorted(p.name for p in images.glob("*.parquet")) == sorted(
            f"{n[:-4]}.parquet" for n in stored)
        # the same shards as the local build's, read back from the bucket
        mirror = tmp_path_factory.mktemp(f"mirror{part}")
        for name in stored:
            fs.get(f"{prefix}/{name}", str(mirror / name))
        assert shard_samples(mirror, ".") == shard_samples(local.path, f"data/images/part_{part}")
        # faces and embeddings were computed from the bucket's shards: the same as local ones
        assert pq.read_table(project / f"data/faces/part_{part}/faces.parquet").equals(
            pq.read_table(local / f"data/faces/part_{part}/faces.parquet"))
        a, b = (pq.read_table(p / f"data/embed/part_{part}/metadata/metadata_0.parquet") for p in (local, project))
        assert a.column(KEY_COLUMN).to_pylist() == b.column(KEY_COLUMN).to_pylist()
        np.testing.assert_allclose(np.load(project / f"data/embed/part_{part}/img_emb/img_emb_0.npy"),
                                   np.load(local / f"data/embed/part_{part}/img_emb/img_emb_0.npy"), atol=1e-5)
    assert pq.read_table(project / "data/selected/selected.parquet").equals(
        pq.read_table(local / "data/selected/selected.parquet"))
    assert digest(project / "data/dataset") == digest(local / "data/dataset")  # assembled from the bucket
    report = (project / "data/report/index.html").read_text()
    assert report.count("data:image/jpeg;base64,") > 10  # the report's grids, from the bucket too

    # DVC tracks the manifests: nothing is stale, a threshold sweep never touches the bucket
    assert project.build(*RECIPE, f"download.shards_url=s3://{BUCKET}/local").ran == []
    before = {p: fs.info(p)["LastModified"] for p in fs.find(f"{BUCKET}/local")}
    ran = project.build(*RECIPE, f"download.shards_url=s3://{BUCKET}/local", "select.min_clip_similarity=-0.04").ran
    assert ran and not any(s.startswith(("download", "faces", "watermark", "embed")) for s in ran), ran
    assert {p: fs.info(p)["LastModified"] for p in fs.find(f"{BUCKET}/local")} == before
    # a forced rerun of a download (same input, same settings) takes the committed prefix as it is
    manifest = (project / "data/images/part_0/shards.json").read_text()
    project.laionbuild("stage", "download", "--part", "0")
    assert (project / "data/images/part_0/shards.json").read_text() == manifest
    assert {p: fs.info(p)["LastModified"] for p in fs.find(f"{BUCKET}/local")} == before

    # a shard gone from the bucket: readers stop with an error naming the manifest and the shard
    [prefix] = _prefixes(fs, 0)
    victim = sorted(p for p in fs.ls(prefix) if p.endswith(".tar"))[0]
    fs.rm(victim)
    failed = project.laionbuild("stage", "embed", "--part", "0", check=False)
    assert failed.returncode != 0
    assert "data/images/part_0/shards.json" in failed.output and f"s3://{victim} is missing" in failed.output
    assert (project / "data/embed/part_0/img_emb/img_emb_0.npy").exists()  # the built part is untouched


def test_shards_url_is_validated(project):
    bad = project.laionbuild("compose", "download.shards_url=relative/dir", check=False)
    assert bad.returncode != 0 and "download.shards_url" in bad.output and "absolute" in bad.output
    unknown = project.laionbuild("compose", "download.shards_url=nosuchfs://x/y", check=False)
    assert unknown.returncode != 0 and "download.shards_url" in unknown.output and "nosuchfs" in unknown.output


def test_gc_shards_deletes_only_prefixes_no_build_refers_to(s3, tmp_path):
    """A committed build, a side branch merged with `-s ours` and deleted, a build thrown away
    (params and dvc.lock checked out again), two DVC experiments (one in the workspace), a killed
    download's prefix and a retry scratch leftover: `gc-shards` deletes the thrown-away build's
    prefix alone; every build that remains reads its shards, and rebuilding the thrown-away one
    downloads it again (its DVC run-cache entry is dropped with it)."""
    import shutil

    from dvc.repo import Repo

    from laionbuild.shards.storage import part_shards

    from .conftest import Project

    fs, _ = s3
    Project(tmp_path).laionbuild("init", str(tmp_path / "ds"))
    repo = Project(tmp_path / "ds")
    url = f"s3://{BUCKET}/gc"
    common = [*FAST, "subset.parts=[0]", f"download.shards_url={url}"]

    def build(*overrides: str):
        return repo.laionbuild("build", "--stage", "download@0", *common, *overrides)

    def in_use() -> str:
        return json.loads((repo / "data/images/part_0/shards.json").read_text())["url"].rsplit("/", 1)[-1]

    def stored() -> set[str]:  # (listed by object: a versioned bucket keeps deleted "directories")
        fs.invalidate_cache()
        return {p.split("/")[2] for p in fs.find(f"{BUCKET}/gc")}

    def back_to_head() -> None:
        repo.run("git", "checkout", "--", "params.yaml", "dvc.lock")
        repo.dvc("checkout", "download@0")  # (built up to download only)

    build("download.image_size=80")
    committed = in_use()
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-qm", "build: image_size=80")
    repo.run("git", "checkout", "-q", "-b", "side")
    build("download.image_size=90")
    merged = in_use()
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-qm", "build: image_size=90")
    repo.run("git", "checkout", "-q", "-")
    repo.run("git", "merge", "-q", "-s", "ours", "side", "-m", "merge side, keeping ours")
    repo.run("git", "branch", "-q", "-D", "side")  # reachable through the merge only
    back_to_head()
    build("download.image_size=100")
    dropped = in_use()
    back_to_head()
    assert in_use() == committed
    repo.laionbuild("build", "-m", "--stage", "download@0", *common, "download.image_size=64,72")
    workspace = in_use()  # the last experiment's outputs stay in the workspace
    [experiment] = stored() - {committed, merged, dropped, workspace}
    killed = "part_0-0123456789abcdef"
    fs.pipe(f"{BUCKET}/gc/{killed}/00000.tar", b"half a shard")
    fs.pipe(f"{BUCKET}/gc/_scratch/5f0e/00000.tar", b"a retry round's")
    everything = stored()
    assert everything == {committed, merged, dropped, workspace, experiment, killed, "_scratch"}

    listed = repo.laionbuild("gc-shards").output
    assert re.search(rf"{dropped}  unreferenced  \d+\.\d MB", listed)
    for name in (committed, merged, experiment):
        assert re.search(rf"{name}  kept: commit \w+", listed), name
    assert re.search(rf"{workspace}  kept: .*workspace", listed)
    assert f"{killed}  kept: incomplete" in listed and "_scratch/5f0e  kept: incomplete" in listed
    assert "1 prefix, " in listed and stored() == everything  # listed, nothing deleted

    # a manifest DVC's cache no longer holds may name any prefix: nothing is deleted
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    [out] = lock["stages"]["download@0"]["outs"]
    cache = repo / ".dvc/cache/files/md5"
    listing = json.loads((cache / out["md5"][:2] / out["md5"][2:]).read_text())
    oid = next(i["md5"] for i in listing if i["relpath"] == "shards.json")
    object_path = cache / oid[:2] / oid[2:]
    shutil.move(object_path, tmp_path / "away")
    refused = repo.laionbuild("gc-shards", "--delete", check=False)
    assert refused.returncode == 1 and "not in the DVC cache" in refused.output and "nothing deleted" in refused.output
    shutil.move(tmp_path / "away", object_path)
    # nor while a build holds the project's DVC lock
    with Repo(str(repo.path)) as dvc_repo, dvc_repo.lock:
        locked = repo.laionbuild("gc-shards", "--delete", check=False)
    assert locked.returncode != 0 and "DVC lock is held" in locked.output
    assert stored() == everything

    deleted = repo.laionbuild("gc-shards", "--delete").output
    assert "deleted 1 prefix, " in deleted and "dropped 1 DVC run-cache entries" in deleted
    assert stored() == everything - {dropped}
    repo.laionbuild("gc-shards", "--delete", "--incomplete")
    assert stored() == {committed, merged, workspace, experiment}

    # every build left reads its shards: the workspace, the other experiment, the commit
    assert part_shards(repo / "data/images/part_0")
    # (exp apply fails on the stages after download, never built; download@0's output is applied)
    repo.dvc("exp", "apply", "image_size=64", check=False)
    repo.dvc("checkout", "download@0")
    assert in_use() == experiment and part_shards(repo / "data/images/part_0")
    back_to_head()
    assert in_use() == committed and part_shards(repo / "data/images/part_0")
    assert build("download.image_size=80").ran == []
    # the thrown-away build again: downloaded again, not restored from DVC's run-cache
    again = build("download.image_size=100")
    assert "download@0" in again.ran and in_use() == dropped
    assert part_shards(repo / "data/images/part_0") and dropped in stored()
