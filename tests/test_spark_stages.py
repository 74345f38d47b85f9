"""engine=spark for the heavy stages: img2dataset's pyspark distributor downloads, clip-retrieval's
pyspark distributor embeds (a task per shard, executors loading the model), autofaiss's
distributed="pyspark" adds the vectors to the index, on local[2] — the
same selected samples, dataset shards and (within float tolerance) embeddings as engine=local:
on the demo as on a cluster without a shared disk (shards and intermediate files in an S3
bucket), and on a 3-part stand-in with everything in the workspace.
A Python worker killed mid-task is retried by Spark; the output is complete and duplicate-free."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import tarfile
import threading
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from laionbuild.project.layout import KEY_COLUMN
from laionbuild.shards.storage import part_shards

from .conftest import S3_BUCKET, new_project, spark_jobs
from .imageserver import ImageServer, source_overrides
from .shared_demo import RECIPE, shared_demo
from .standins import write_laion400m
from .test_download_web import write_urls
from .webfaults import FaultyWeb


def shard_samples(root, rel: str) -> dict[str, bytes]:
    """key -> image bytes over a directory of webdataset shards (or the shards its manifest lists:
    download.shards_url)."""
    found = {}
    for shard in part_shards(root / rel):
        with shard.open() as f, tarfile.open(fileobj=f) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if name.endswith(".json"):
                    key = json.loads(tar.extractfile(member).read())["key"]
                    stem = name[:-5]
                    image = next(members[n] for n in members if n.startswith(stem + ".") and n.endswith(".jpg"))
                    assert key not in found, f"{key} twice in {rel}"
                    found[key] = tar.extractfile(image).read()
    return found


def digest(path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def both(tmp_path_factory, shared_spark, s3):
    """The shared demo build (engine=local) and the same recipe built on Spark, as on a cluster
    whose executors share no disk with the driver: the shards in an S3 bucket
    (download.shards_url), clip_inference's partitions and autofaiss's input and task indices
    there too (engine.shared_tmp). The executors get the store's endpoint and credentials the way
    a cluster's would, from their environment (here: the jobs')."""
    from laionbuild.engine.spark import executor_environment

    local, _ = shared_demo(tmp_path_factory)
    on_spark = new_project(tmp_path_factory.mktemp("spark_stages") / "spark", cache="own")
    jobs = spark_jobs(shared_spark)
    opener_stats = []  # each download's policy opener: executors' workers must have installed it
    handler = logging.Handler()
    handler.emit = lambda r: opener_stats.append(r.args) if str(r.msg).startswith("policy opener") else None
    logger = logging.getLogger("laionbuild.stages.download")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with executor_environment(shared_spark, tuple(s3[1])):
            on_spark.build_in_process(*RECIPE, "engine=spark", "engine.master=active",
                                      f"download.shards_url=s3://{S3_BUCKET}/spark",
                                      f"engine.shared_tmp=s3://{S3_BUCKET}/tmp")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    # prepare x2, dedup, download x2 (a task per shard), embed x2, index at least
    assert spark_jobs(shared_spark) - jobs >= 8
    assert len(opener_stats) == 2 and all(s["processes"] > 0 for s in opener_stats), opener_stats
    return local, on_spark


def test_spark_download_and_embed_give_the_local_result(both):
    local, spark = both
    for part in (0, 1):
        rel = f"data/images/part_{part}"
        assert shard_samples(spark.path, rel) == shard_samples(local.path, rel)
        a, b = (pq.read_table(p / f"data/embed/part_{part}/metadata/metadata_0.parquet") for p in (local, spark))
        assert a.column(KEY_COLUMN).to_pylist() == b.column(KEY_COLUMN).to_pylist()
        for kind in ("img_emb", "text_emb"):
            np.testing.assert_allclose(np.load(spark / f"data/embed/part_{part}/{kind}/{kind}_0.npy"),
                                       np.load(local / f"data/embed/part_{part}/{kind}/{kind}_0.npy"), atol=1e-5)
    assert pq.read_table(spark / "data/selected/selected.parquet").equals(
        pq.read_table(local / "data/selected/selected.parquet"))
    assert digest(spark / "data/dataset") == digest(local / "data/dataset")


def test_spark_executors_write_and_read_through_the_bucket(both, s3):
    """Nothing went through the driver's disk: the shards are in the bucket (the parts keep their
    manifests), and what the stages put under engine.shared_tmp was written there and removed."""
    _, spark = both
    fs, _ = s3
    for part in (0, 1):
        manifest = json.loads((spark / f"data/images/part_{part}/shards.json").read_text())
        assert manifest["url"].startswith(f"s3://{S3_BUCKET}/spark/part_{part}-") and manifest["shards"]
        assert not list((spark / f"data/images/part_{part}").glob("*.tar"))
    written = {v["Key"] for v in fs.call_s3("list_object_versions", Bucket=S3_BUCKET, Prefix="tmp/")["Versions"]}
    left = {p for p, e in fs.find(f"{S3_BUCKET}/tmp", detail=True).items() if e["size"]}  # (empty folder markers aside)
    assert not left, (left, written)
    for part in (0, 1):  # clip_inference's output partitions
        assert any(k.startswith(f"tmp/clip_inference.part_{part}.") and k.endswith(".npy") for k in written), written
    assert any(k.startswith("tmp/index_embeddings.") and k.endswith(".npy") for k in written), written
    assert any("/stage-1/index_" in k for k in written), written  # autofaiss's task indices


def test_spark_index_holds_every_selected_embedding(both):
    """autofaiss's distributed="pyspark" path: same vectors as the local index, and each
    embedding's top hit scores what exact search scores."""
    import faiss

    local, spark = both
    emb = np.concatenate([np.load(p) for p in sorted((spark / "data/embeddings/img_emb").glob("*.npy"))])
    emb = emb.astype(np.float32)
    indexes = {name: faiss.read_index(str(p / "data/index/image.index")) for name, p in (("local", local), ("spark", spark))}
    assert indexes["spark"].ntotal == indexes["local"].ntotal == len(emb) > 0
    scores, _ = indexes["spark"].search(emb, 1)
    np.testing.assert_allclose(scores[:, 0], (emb @ emb.T).max(axis=1), atol=1e-3)
    infos = json.loads((spark / "data/index/image_infos.json").read_text())
    assert infos["index_key"].startswith("IVF"), infos  # the pyspark path builds memory-mappable indexes
    assert not list((spark / "data/.tmp").glob("autofaiss_indices/*"))  # task indices cleaned up


def _serve_standin(directory, server_url: str) -> None:
    """A 3-part LAION-400M stand-in (real file and column names, NSFW tags, similarity, dups
    within and across parts) whose URLs point at the loopback image server."""
    write_laion400m(directory, parts=3, rows=30, seed=3)
    for path in sorted(directory.glob("*.parquet")):
        table = pq.read_table(path)
        urls = pc.replace_substring(table.column("URL"), "http://img.example.com/", f"{server_url}/img/")
        pq.write_table(table.set_column(table.schema.get_field_index("URL"), "URL", urls), path)


def test_spark_builds_a_three_part_standin_like_local(tmp_path, shared_spark):
    with ImageServer() as server:
        _serve_standin(tmp_path / "source", server.url)
        common = ["recipe=laion400m", f"source.base_url={tmp_path / 'source'}", "subset.parts=[0,1,2]",
                  "embed.pretrained=random", "select.min_clip_similarity=-0.02", "download.allow_private_urls=true",
                  "download.local_server.host=null", "download.local_server.root=null"]
        local, on_spark = new_project(tmp_path / "local"), new_project(tmp_path / "spark")
        local.build_in_process(*common, "engine=local")  # (DVC is not what is compared: no dvc repro)
        jobs = spark_jobs(shared_spark)
        on_spark.build_in_process(*common, "engine=spark", "engine.master=active")
        assert spark_jobs(shared_spark) - jobs >= 11
    spark = on_spark
    assert sum(len(shard_samples(local.path, f"data/images/part_{p}")) for p in range(3)) > 30
    for part in range(3):
        rel = f"data/images/part_{part}"
        assert shard_samples(spark.path, rel) == shard_samples(local.path, rel)
        for kind in ("img_emb", "text_emb"):
            np.testing.assert_allclose(np.load(spark / f"data/embed/part_{part}/{kind}/{kind}_0.npy"),
                                       np.load(local / f"data/embed/part_{part}/{kind}/{kind}_0.npy"), atol=1e-5)
    assert pq.read_table(spark / "data/prepared/part_1/metadata.parquet").equals(
        pq.read_table(local / "data/prepared/part_1/metadata.parquet"))
    assert pq.read_table(spark / "data/selected/selected.parquet").equals(
        pq.read_table(local / "data/selected/selected.parquet"))
    assert digest(spark / "data/dataset") == digest(local / "data/dataset")
    assert json.loads((spark / "data/metrics/funnel.json").read_text())["indexed"] == \
        json.loads((local / "data/metrics/funnel.json").read_text())["indexed"]


def _below_download_stage(pid: int) -> bool:
    """Whether `laionbuild stage download` is `pid` or one of its ancestors."""
    while pid > 1:
        try:
            if b"download" in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0"):
                return True
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _kill_one_worker(stop: threading.Event, killed: list) -> None:
    """SIGKILL the first Spark Python worker (a child of laionbuild.engine.spark_daemon) seen busy."""
    me = os.getpid()
    while not stop.is_set() and not killed:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == me:
                continue
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
                parent = open(f"/proc/{ppid}/cmdline", "rb").read().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            # workers are forked from the daemon: same command line, parent is the daemon; and
            # the build's (below its download stage process), not the test session's shared one
            if (b"laionbuild.engine.spark_daemon" in cmdline and b"laionbuild.engine.spark_daemon" in parent
                    and _below_download_stage(ppid)):
                time.sleep(0.8)  # let it start downloading its shard
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
                except ProcessLookupError:
                    continue
                return
        time.sleep(0.05)


def test_a_killed_spark_worker_is_retried_and_the_output_is_complete(tmp_path):
    project = new_project(tmp_path / "project", cache="own")
    with FaultyWeb(delay=0.1) as web:
        urls = [web.url(0, f"/img/{i}.jpg") for i in range(40)]
        write_urls(tmp_path / "source", urls)
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_one_worker, args=(stop, killed), daemon=True)
        killer.start()
        try:
            project.build(*source_overrides(tmp_path / "source"), "download.allow_private_urls=true",
                          "download.thread_count=2", "download.number_sample_per_shard=10", "download.max_per_host=8",
                          "engine=spark", "engine.master='local[2,4]'", "--stage", "download")  # 4 attempts per task
        finally:
            stop.set()
            killer.join(5)
    assert killed, "no Spark worker was seen (the kill could not be tested)"
    samples = shard_samples(project.path, "data/images/part_0")  # asserts no key twice
    assert len(samples) == 40
    stats = json.loads((project / "data/images/part_0/stats.json").read_text())
    assert stats["counts"]["downloaded_ok"] == 40
