"""download.shards_url: img2dataset writes the shards to an object store (here a real S3 server on
127.0.0.1, moto's), on the local engine and through Spark executors; every reader (faces, embed,
assemble, the report's grids) reads them back from there, and the build gives the same dataset
as the one whose shards sit in the workspace. DVC tracks the part's manifest, not the tars."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager

import numpy as np
import pyarrow.parquet as pq
import pytest

from laionbuild.stages.download import KEY_COLUMN

from .conftest import new_project, spark_jobs
from .shared_demo import RECIPE, copy_of, shared_demo
from .test_spark_stages import digest, shard_samples

BUCKET = "laionbuild-shards"


@contextmanager
def environment(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 with one bucket; its endpoint and credentials in the
    environment (what the stage processes and the build's subprocesses see). Yields an s3fs."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    values = dict(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                  AWS_DEFAULT_REGION="us-east-1")
    try:
        with environment(**values):
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir(BUCKET)
            # versioned: what a stage wrote and removed again can still be listed
            fs.call_s3("put_bucket_versioning", Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
            yield fs, values
    finally:
        server.stop()


def _prefixes(fs, part: int) -> list[str]:
    return [p for p in fs.ls(f"{BUCKET}/local") if p.rsplit("/", 1)[-1].startswith(f"part_{part}-")]


def test_shards_on_s3_build_the_same_dataset(s3, tmp_path_factory):
    fs, _ = s3
    local, _ = shared_demo(tmp_path_factory)
    project = copy_of(local, tmp_path_factory.mktemp("s3") / "project")
    project.run("rm", "-rf", "data", ".dvc/cache")  # the same project, built again from nothing
    project.build(*RECIPE, f"download.shards_url=s3://{BUCKET}/local")

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

    # a shard gone from the bucket: readers stop with an error naming the manifest and the shard
    [prefix] = _prefixes(fs, 0)
    victim = sorted(p for p in fs.ls(prefix) if p.endswith(".tar"))[0]
    fs.rm(victim)
    failed = project.laionbuild("stage", "embed", "--part", "0", check=False)
    assert failed.returncode != 0
    assert "data/images/part_0/shards.json" in failed.output and f"s3://{victim} is missing" in failed.output
    assert (project / "data/embed/part_0/img_emb/img_emb_0.npy").exists()  # the built part is untouched


def test_spark_executors_write_and_read_the_shards_on_s3(s3, tmp_path_factory, shared_spark):
    """img2dataset's pyspark distributor writes the shards from the executors; clip-retrieval's
    pyspark distributor reads them there (webdataset `pipe:` through fsspec) and writes its
    partitions to engine.shared_tmp in the bucket, where autofaiss's pyspark path also reads the
    embeddings and writes its task indices. The executors get the store's endpoint and
    credentials the way a cluster's would (here: the job environment)."""
    from laionbuild.engines import executor_environment

    fs, values = s3
    local, _ = shared_demo(tmp_path_factory)
    project = new_project(tmp_path_factory.mktemp("s3_spark") / "project")
    jobs = spark_jobs(shared_spark)
    with executor_environment(shared_spark, tuple(values)):
        project.build_in_process(*RECIPE, "engine=spark", "engine.master=active",
                                 f"download.shards_url=s3://{BUCKET}/spark", f"engine.shared_tmp=s3://{BUCKET}/tmp")
    assert spark_jobs(shared_spark) - jobs >= 5  # download x2, embed x2, index at least
    for part in (0, 1):
        manifest = json.loads((project / f"data/images/part_{part}/shards.json").read_text())
        assert manifest["url"].startswith(f"s3://{BUCKET}/spark/part_{part}-") and manifest["shards"]
        assert not list((project / f"data/images/part_{part}").glob("*.tar"))
        a, b = (pq.read_table(p / f"data/embed/part_{part}/metadata/metadata_0.parquet") for p in (local, project))
        assert a.column(KEY_COLUMN).to_pylist() == b.column(KEY_COLUMN).to_pylist()
        for kind in ("img_emb", "text_emb"):
            np.testing.assert_allclose(np.load(project / f"data/embed/part_{part}/{kind}/{kind}_0.npy"),
                                       np.load(local / f"data/embed/part_{part}/{kind}/{kind}_0.npy"), atol=1e-5)
    assert digest(project / "data/dataset") == digest(local / "data/dataset")
    import faiss

    assert faiss.read_index(str(project / "data/index/image.index")).ntotal == \
        faiss.read_index(str(local / "data/index/image.index")).ntotal > 0
    written = {v["Key"] for v in fs.call_s3("list_object_versions", Bucket=BUCKET, Prefix="tmp/")["Versions"]}
    left = {p for p, e in fs.find(f"{BUCKET}/tmp", detail=True).items() if e["size"]}  # (empty folder markers aside)
    assert not left, (left, written)  # clip_inference's partitions, staged embeddings, task indices: removed
    assert any(k.startswith("tmp/clip_inference.part_1.") and k.endswith("img_emb_0.npy") for k in written), written
    assert any(k.startswith("tmp/index_embeddings.") and k.endswith(".npy") for k in written), written
    assert any("/stage-1/index_" in k for k in written), written  # autofaiss's task indices


def test_shards_url_is_validated(project):
    bad = project.laionbuild("compose", "download.shards_url=relative/dir", check=False)
    assert bad.returncode != 0 and "download.shards_url" in bad.output and "absolute" in bad.output
    unknown = project.laionbuild("compose", "download.shards_url=nosuchfs://x/y", check=False)
    assert unknown.returncode != 0 and "download.shards_url" in unknown.output and "nosuchfs" in unknown.output
