"""The download stage against a misbehaving loopback web (tests/webfaults.py): faults at 30 %
of URLs, per-host concurrency caps and 429 back-off in the workers' policy opener, the URL policy on
redirects, and `laionbuild retry-failed`."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laionbuild.shards.storage import part_shards
from laionbuild.web.failures import REFUSED_HOP, REFUSED_HOP_AMBIGUOUS, REFUSED_HOP_SCHEME, classify, transient

from .imageserver import source_overrides
from .webfaults import FaultyWeb


def write_urls(directory, urls: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "SAMPLE_ID": list(range(len(urls))), "URL": urls,
        "TEXT": [f"a generated picture number {i}" for i in range(len(urls))], "NSFW": ["UNLIKELY"] * len(urls),
    }), directory / "part-00000.parquet")


def stats(project) -> dict:
    return json.loads((project / "data/images/part_0/stats.json").read_text())


@pytest.mark.parametrize("message,reason,is_transient", [
    ("HTTP Error 404: Not Found", "http 404", False),
    ("HTTP Error 503: Service Unavailable", "http 503", True),
    ("HTTP Error 429: Too Many Requests", "http 429", True),
    ("HTTP Error 403: laionbuild proxy: refused by URL policy", REFUSED_HOP, False),
    ("HTTP Error 504: laionbuild proxy: timeout", "timeout", True),
    ("<urlopen error laionbuild policy: refused by URL policy: not http(s)>", REFUSED_HOP_SCHEME, False),
    ("<urlopen error laionbuild policy: refused by URL policy: private or non-global address>", REFUSED_HOP, False),
    ("<urlopen error laionbuild policy: refused by URL policy: ambiguous redirect (several Location or a URI "
     "header)>", REFUSED_HOP_AMBIGUOUS, False),
    ("<urlopen error laionbuild policy: dns error: a.example does not resolve>", "dns error", True),
    ("The read operation timed out", "timeout", True),
    ("<urlopen error [Errno 111] Connection refused>", "connection error", True),
    ("<urlopen error [Errno -2] Name or service not known>", "dns error", True),
    ("IncompleteRead(1024 bytes read, 1024 more expected)", "truncated body", True),
    ("Image decoding error", "not an image", False),
    ("image area too large", "image area too large", False),
    ("Use of image disallowed by X-Robots-Tag directive", "opted out (X-Robots-Tag)", False),
])
def test_failure_reasons(message, reason, is_transient):
    assert classify(message) == reason
    assert transient(reason) is is_transient


def test_faults_at_30_percent_are_all_accounted(project, tmp_path):
    kinds = ["missing", "error", "hang", "stall", "truncated", "notimage", "huge", "redirect", "optout"]
    with FaultyWeb(hosts=["127.0.0.1", "127.0.0.2"], redirect_host="127.0.0.2", hang=5) as web:
        urls = [web.url(0, f"/img/{i}.jpg") for i in range(60)] + [web.url(0, f"/slow/{i}.jpg") for i in range(4)]
        urls += [web.url(0, f"/{kind}/{i}.jpg") for kind in kinds for i in range(4)]  # 36 of 100
        write_urls(tmp_path / "source", urls)
        # the policy refuses private addresses except the allowlisted 127.0.0.1: the redirects to
        # 127.0.0.2 are refused at the hop, by the workers' opener
        project.build(*source_overrides(tmp_path / "source"), "download.allow_private_urls=false",
                      "download.private_host_allowlist=[127.0.0.1]", "download.timeout=2",
                      "download.max_image_area=4000000", "download.number_sample_per_shard=32",
                      # all on one host: a cap of 4 would queue fast URLs behind the hanging ones until
                      # the client's timeout (they would fail as timeouts, see README "Politeness")
                      "download.max_per_host=16",
                      "--stage", "download")
        assert not any(host == "127.0.0.2" for host, _ in web.requests)  # never reached
    s = stats(project)
    assert s["counts"] == {"download_attempted": 100, "refused_by_url_policy": 0, "downloaded_ok": 64,
                           "download_failed": 36}
    assert s["failures"] == {"http 404": 4, "http 500": 4, "timeout": 8, "truncated body": 4, "not an image": 4,
                             "image area too large": 4, REFUSED_HOP: 4, "opted out (X-Robots-Tag)": 4}
    images = 0
    for path in sorted((project / "data/images/part_0").glob("*.tar")):
        with tarfile.open(path) as tar:  # no truncated member, and every image in it decodes
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                assert len(data) == member.size, (path, member.name)
                if member.name.endswith(".jpg"):
                    Image.open(io.BytesIO(data)).load()
                    images += 1
    assert images == s["counts"]["downloaded_ok"]


def test_per_host_cap_keeps_busy_hosts_happy(project, tmp_path):
    hosts = [f"127.0.0.{i}" for i in range(1, 5)]
    with FaultyWeb(hosts=hosts, limit=2, delay=0.2) as web:
        urls = [web.url(h, f"/img/{i}.jpg") for h in range(4) for i in range(12)]
        write_urls(tmp_path / "source", urls)
        overrides = [*source_overrides(tmp_path / "source"), "download.allow_private_urls=true",
                     "download.thread_count=16", "download.number_sample_per_shard=48"]
        project.build(*overrides, "download.max_per_host=2", "--stage", "download")
        assert web.too_many == 0 and max(web.peak.values()) <= 2
        assert stats(project)["counts"]["downloaded_ok"] == 48
        # the same build without the cap: the busy hosts answer 429 (so the check above can fail)
        project.build(*overrides, "download.max_per_host=null", "download.backoff_seconds=0", "--stage", "download")
        assert web.too_many > 0 and max(web.peak.values()) > 2
        # (the opener still retries those 429s within its budget, so how many end as failures depends
        # on timing; every row is accounted for either way)
        s = stats(project)
        assert s["counts"]["downloaded_ok"] + sum(s["failures"].values()) == 48


def test_429_is_backed_off_and_retried(project, tmp_path):
    with FaultyWeb(retry_after="1") as web:
        write_urls(tmp_path / "source", [web.url(0, f"/backoff/{i}.jpg") for i in range(6)])
        project.build(*source_overrides(tmp_path / "source"), "download.allow_private_urls=true",
                      # the back-off budget is 0.6 x timeout: each 429 pauses the host 1 s, and on a loaded
                      # machine the six first requests can arrive one after the other (6 s of pauses)
                      "download.timeout=20", "--stage", "download")
        assert all(n == 2 for n in web.requests.values())  # one 429, then the image
    assert stats(project)["counts"]["downloaded_ok"] == 6


def _image_keys(project, part: int = 0) -> list[str]:
    keys = []
    for shard in part_shards(project / f"data/images/part_{part}"):
        with shard.open() as f, tarfile.open(fileobj=f) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".jpg")]
    return keys


@pytest.mark.parametrize("shared", [False, True], ids=["workspace", "shards_url"])
def test_retry_failed_merges_recovered_samples(project, tmp_path, shared):
    """Also with the shards under download.shards_url (here a file:// folder outside the project,
    as a shared mount): the recovered part goes to a new prefix, the old one stays as it was."""
    shards_url = [f"download.shards_url=file://{tmp_path / 'shared'}"] if shared else []
    with FaultyWeb() as web:
        urls = [web.url(0, f"/img/{i}.jpg") for i in range(10)] + [web.url(0, f"/flaky/{i}.jpg") for i in range(10, 14)]
        urls += [web.url(0, f"/missing/{i}.jpg") for i in range(14, 16)]
        write_urls(tmp_path / "source", urls)
        overrides = [*source_overrides(tmp_path / "source"), "download.allow_private_urls=true",
                     "download.number_sample_per_shard=6", "select.min_clip_similarity=null", *shards_url]
        project.build(*overrides, "--stage", "download")  # (the rest is built after the retry)
        before = stats(project)
        first = json.loads((project / "data/images/part_0/shards.json").read_text()) if shared else None
        assert before["counts"]["downloaded_ok"] == 10 and before["failures"] == {"http 503": 4, "http 404": 2}
        out = project.laionbuild("retry-failed").output
        assert "4 transient failures re-attempted, 4 recovered" in out
        assert sum(n for (_, path), n in web.requests.items() if path.startswith("/missing/")) == 2  # 404s not retried
    after = stats(project)
    assert after["counts"]["downloaded_ok"] == 14 and after["failures"] == {"http 404": 2}
    keys = _image_keys(project)
    assert len(keys) == len(set(keys)) == 14
    if shared:
        assert not list((project / "data/images/part_0").glob("*.tar"))
        second = json.loads((project / "data/images/part_0/shards.json").read_text())
        assert second["url"] != first["url"] and second["url"].startswith(f"file://{tmp_path / 'shared'}/part_0-")
        old = tmp_path / "shared" / first["url"].rsplit("/", 1)[-1]
        assert {p.name: p.stat().st_size for p in old.glob("*.tar")} == {s["name"]: s["size"] for s in first["shards"]}
    assert project.status()["download@0"] == "built"  # recorded in dvc.lock
    rebuilt = project.build(*overrides)
    assert "download@0" not in rebuilt.ran and "embed@0" in rebuilt.ran
    funnel = json.loads((project / "data/metrics/funnel.json").read_text())
    assert funnel["downloaded_ok"] == funnel["embedded"] == 14


def test_download_stage_and_its_workers_never_import_torch(tmp_path_factory):
    """img2dataset needs no torch; its imports pull it in when they can, in the stage process and
    again in every worker and logger it spawns (laionbuild.web.without_torch). `-X importtime`
    reaches the spawned children too (multiprocessing passes interpreter flags on)."""
    import subprocess
    import sys

    from .conftest import BIN, build_env
    from .shared_demo import copy_of, shared_demo

    project = copy_of(shared_demo(tmp_path_factory)[0], tmp_path_factory.mktemp("no_torch") / "project")
    before = stats(project)["counts"]
    proc = subprocess.run([sys.executable, "-X", "importtime", str(BIN / "laionbuild"), "stage", "download",
                           "--part", "0"], cwd=project.path, env=build_env(), text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    # the stage process, img2dataset's logger process and its download worker each import it
    assert imported.count("img2dataset.downloader") >= 3
    assert "webdataset" in imported and "albumentations" in imported
    # (importtime also lists refused attempts, `torch` itself among them; an import that went
    # through loads torch's extension module)
    assert "torch._C" not in imported and "torch.version" not in imported
    assert "runs without torch" in proc.stderr and "LAIONBUILD_WITHOUT_TORCH=0" in proc.stderr
    after = stats(project)["counts"]
    assert after["downloaded_ok"] == before["downloaded_ok"] > 0


def test_without_torch_can_be_turned_off():
    import subprocess
    import sys

    code = ("import importlib.util\n"
            "from laionbuild.web import without_torch\n"
            "print(without_torch.enable())\n"
            "print(importlib.util.find_spec('torch') is not None)\n"  # pyspark probes it so: no error
            "import torch\n"
            "print(torch.tensor([1]).sum().item())")
    refused = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True)
    assert refused.returncode != 0 and "ModuleNotFoundError" in refused.stderr
    assert refused.stdout.split() == ["True", "False"]
    allowed = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True,
                             env={**os.environ, "LAIONBUILD_WITHOUT_TORCH": "0"})
    assert allowed.returncode == 0 and allowed.stdout.split() == ["False", "True", "1"], allowed.stderr
    # the variable carries the refusing process's pid: only its own children honour it
    exported = subprocess.run([sys.executable, "-c", "import laionbuild, torch"], text=True, capture_output=True,
                              env={**os.environ, "LAIONBUILD_WITHOUT_TORCH": "1"})
    assert exported.returncode == 0, exported.stderr
