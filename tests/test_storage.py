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

from laionbuild.stages.download import KEY_COLUMN

from .conftest import FAST, S3_BUCKET as BUCKET
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
    assert ran and not any(s.startswith(("download", "faces", "embed")) for s in ran), ran
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
