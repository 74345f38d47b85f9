"""Every file a stage reads is a dependency (laionbuild/project/inputs.py, the `inputs` stage):
a source part edited in place or republished remotely, an id list, a head's weights file that
appears, a local checkpoint rewritten — each reruns exactly the stages that read it, on real
DVC projects through the CLI, with remote files on a loopback HTTP server; `laionbuild status`
says whether a stage is stale for a file or for a recipe key."""

from __future__ import annotations

import email.utils
import hashlib
import json
import re
import shutil
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from laionbuild.project.inputs import consumers, expected
from laionbuild.recipe.schema import compose

from .conftest import FAST, ROOT, new_project
from .shared_demo import RECIPE, copy_of, shared_demo


class FolderServer:
    """Serves a folder on 127.0.0.1 as a store does: HEAD and GET with Range, an ETag (md5 of the
    bytes) and Last-Modified, a folder as an HTML index of links; counts GETs per path and the
    most requests it answered at once; `delay` seconds before each answer."""

    def __init__(self, root: Path, delay: float = 0.0, fail_first: int = 0):
        self.root, self.delay, self.fail_first = root, delay, fail_first  # the first requests answer 503
        self.gets: Counter = Counter()
        self.in_flight = self.most_in_flight = 0
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _head(self) -> bytes | None:
                with lock:
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                finally:
                    with lock:
                        server.in_flight -= 1
                path = server.root / self.path.lstrip("/")
                if path.is_dir():
                    links = "".join(f'<a href="{c.name}">{c.name}</a>\n' for c in sorted(path.iterdir()))
                    return f"<html><body>\n{links}</body></html>".encode()
                failing, server.fail_first = server.fail_first > 0, server.fail_first - 1
                if failing or not path.is_file():
                    self.send_response(503 if failing else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return path.read_bytes()

            def _headers(self, body: bytes, path: Path, length: int) -> None:
                self.send_header("Content-Length", str(length))
                self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
                self.send_header("Last-Modified", email.utils.formatdate(path.stat().st_mtime, usegmt=True))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_HEAD(self):
                body = self._head()
                if body is not None:
                    self.send_response(200)
                    self._headers(body, server.root / self.path.lstrip("/"), len(body))

            def do_GET(self):
                body = self._head()
                if body is None:
                    return
                server.gets[self.path] += 1
                start, end = 0, len(body) - 1
                match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match:
                    start, end = int(match.group(1)), min(int(match.group(2) or end), end)
                self.send_response(206 if match else 200)
                if match:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self._headers(body, server.root / self.path.lstrip("/"), end + 1 - start)
                self.wfile.write(body[start:end + 1])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FolderServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def drop_last_row(path: Path) -> None:
    """Rewrite a source part in place with its last row gone (a republished or edited part)."""
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 1), path)


def test_dvc_yaml_lists_every_fingerprint_file_as_a_dep_of_the_stages_that_read_it(tmp_path, monkeypatch):
    cfg = compose(["subset.parts=[3]", "source.num_parts=4"], conf_dir=ROOT / "conf")
    monkeypatch.chdir(tmp_path)  # (the check memoises digests under data/.work)
    files = set(expected(cfg))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {}
    for name, stage in stages.items():
        body = stage.get("do") or stage
        for dep in body.get("deps", []):
            if dep.startswith("data/inputs/"):
                stage_name = f"{name}@3" if "do" in stage else name
                declared.setdefault(dep.removeprefix("data/inputs/").replace("${item}", "3"), []).append(stage_name)
    assert set(declared) == files
    for name, readers in declared.items():
        assert sorted(consumers(name, [3])) == sorted(readers), name
    assert stages["inputs"]["always_changed"] is True
    assert stages["inputs"]["outs"] == [{"data/inputs": {"cache": False, "persist": True}}]


def test_the_check_is_concurrent_and_cheap_at_1112_parts(tmp_path, monkeypatch):
    """1,112 remote parts, each metadata request answered after 20 ms (a store's latency):
    checked concurrently, in a fraction of the 22 s one after the other would take; 1,112
    local parts: hashed once, then a stat each."""
    parts = 1112
    folder = tmp_path / "store"
    folder.mkdir()
    for part in range(parts):
        (folder / f"part-{part:05d}.parquet").write_bytes(f"part {part}".encode() * 100)
    common = [f"source.num_parts={parts}", f"subset.parts=[{','.join(map(str, range(parts)))}]",
              "download.local_server.host=null", "download.local_server.root=null"]
    monkeypatch.chdir(tmp_path)
    with FolderServer(folder, delay=0.02) as server:
        cfg = compose([f"source.base_url={server.url}", *common], conf_dir=ROOT / "conf")
        began = time.perf_counter()
        files = expected(cfg)
        remote = time.perf_counter() - began
    entries = [next(iter(files[f"source/part_{p}.json"]["inputs"].values())) for p in range(parts)]
    assert all(e["ETag"] and e["size"] == len(f"part {p}") * 100 for p, e in enumerate(entries))
    assert len({e["ETag"] for e in entries}) == parts
    assert server.gets == Counter()  # nothing downloaded: HEAD requests only
    cfg = compose([f"source.base_url={folder}", *common], conf_dir=ROOT / "conf")
    began = time.perf_counter()
    expected(cfg)
    first = time.perf_counter() - began
    began = time.perf_counter()
    files = expected(cfg)
    again = time.perf_counter() - began
    print(f"inputs check at {parts} parts: remote (20 ms each) {remote:.2f} s, local first {first:.2f} s, "
          f"local again {again:.2f} s")  # (bench/bench_inputs.py measures the ratio to one at a time)
    assert server.most_in_flight > 1, "the remote checks do not run concurrently"
    assert files["source/part_7.json"]["inputs"][f"{folder}/part-00007.parquet"]["md5"] == \
        hashlib.md5(b"part 7" * 100).hexdigest()


def test_a_source_files_glob_is_listed_once_whatever_the_number_of_parts(tmp_path, monkeypatch):
    """`source.files` over a remote folder: the check globs the folder once (not once per part),
    and each part's fingerprint is the store's own (size, ETag)."""
    parts = 40
    folder = tmp_path / "store"
    folder.mkdir()
    for part in range(parts):
        (folder / f"part-{part:05d}.parquet").write_bytes(f"part {part}".encode())
    monkeypatch.chdir(tmp_path)
    with FolderServer(folder) as server:
        cfg = compose([f"source.base_url={server.url}/", "source.files=part-*.parquet", f"source.num_parts={parts}",
                       f"subset.parts=[{','.join(map(str, range(parts)))}]", "download.local_server.host=null",
                       "download.local_server.root=null"], conf_dir=ROOT / "conf")
        server.gets.clear()
        files = expected(cfg)
    listings = sum(n for path, n in server.gets.items() if not path.endswith(".parquet"))
    assert listings <= 2, server.gets  # one glob (fsspec's http glob reads the index twice); per part: 2 × 40
    for part in (0, parts - 1):
        [(url, entry)] = files[f"source/part_{part}.json"]["inputs"].items()
        assert url.endswith(f"/part-{part:05d}.parquet")
        assert entry["ETag"] == f'"{hashlib.md5(f"part {part}".encode()).hexdigest()}"'


def test_a_store_that_fails_is_retried_then_named_and_a_missing_file_is_recorded(tmp_path):
    from laionbuild.project.inputs import remote_fingerprint

    (tmp_path / "part.parquet").write_bytes(b"rows")
    with FolderServer(tmp_path) as server:
        url = f"{server.url}/part.parquet"
        healthy = remote_fingerprint(url)
        assert healthy["size"] == 4 and healthy["ETag"] == f'"{hashlib.md5(b"rows").hexdigest()}"'
        server.fail_first = 3  # HEAD and GET answer 503, then HEAD once more: retried
        assert remote_fingerprint(url, retries=2, backoff=0) == healthy
        server.fail_first = 100
        with pytest.raises(OSError, match=re.escape(url)):
            remote_fingerprint(url, retries=2, backoff=0)
        server.fail_first = 0
        assert remote_fingerprint(f"{server.url}/gone.parquet", backoff=0) == {"missing": True}


def test_republished_remote_parts_and_id_list_refetch_only_what_changed(tmp_path):
    store = tmp_path / "store"
    (store / "metadata").mkdir(parents=True)
    for part in (0, 1):
        shutil.copy(ROOT / f"demo/metadata/part-{part:05d}.parquet", store / "metadata")
    ids = sorted(pq.read_table(store / "metadata/part-00000.parquet").column("SAMPLE_ID").to_pylist()
                 + pq.read_table(store / "metadata/part-00001.parquet").column("SAMPLE_ID").to_pylist())
    (store / "ids.txt").write_text("\n".join(map(str, ids)) + "\n")
    project = new_project(tmp_path / "project")

    def prepared(part: int) -> int:
        return pq.read_metadata(project / f"data/prepared/part_{part}/metadata.parquet").num_rows

    with FolderServer(store) as server:
        recipe = [*FAST, f"source.base_url={server.url}/metadata", "source.num_parts=2", "subset.parts=[0,1]",
                  f"source.ids_url={server.url}/ids.txt"]

        def build():
            return project.laionbuild("build", "--stage", "dedup", *recipe)

        first = build()
        assert first.checked and sorted(first.ran) == ["consolidate", "dedup", "fetch@0", "fetch@1", "prepare@0", "prepare@1"]
        rows = {p: prepared(p) for p in (0, 1)}
        gets = dict(server.gets)
        again = build()
        assert again.checked and again.ran == [] and server.gets == gets  # checked, nothing downloaded
        seconds = float(re.search(r"inputs: \d+ files checked in ([\d.]+) s", again.output).group(1))
        assert seconds < 5, again.output

        drop_last_row(store / "metadata/part-00001.parquet")  # republished: new bytes, ETag, size
        status = project.status_reasons()
        assert status["fetch@1"] == ("stale", f"file: {server.url}/metadata/part-00001.parquet"), status
        assert status["fetch@0"] == ("built", "")
        republished = build()
        assert sorted(republished.ran) == ["dedup", "fetch@1", "prepare@1"]
        assert server.gets["/metadata/part-00000.parquet"] == gets["/metadata/part-00000.parquet"]
        assert server.gets["/metadata/part-00001.parquet"] > gets["/metadata/part-00001.parquet"]
        assert (project / "data/raw/part_1/part-00001.parquet").read_bytes() == \
            (store / "metadata/part-00001.parquet").read_bytes()
        assert prepared(0) == rows[0] and prepared(1) == rows[1] - 1

        kept = ids[: len(ids) // 2]  # a new id list: every part's prepare, no fetch
        (store / "ids.txt").write_text("\n".join(map(str, kept)) + "\n")
        assert project.status_reasons()["prepare@0"] == ("stale", f"file: {server.url}/ids.txt")
        new_ids = build()
        assert sorted(new_ids.ran) == ["dedup", "prepare@0", "prepare@1"]
        assert prepared(0) + prepared(1) < rows[0] + rows[1] - 1


def test_edited_part_head_weights_and_checkpoint_rerun_what_reads_them(tmp_path_factory):
    """On a copy of the shared demo build: a source part edited in place, a head whose weights
    file appears after a build that skipped it, the face detector's cascade file edited, a local
    checkpoint rewritten in place."""
    shared, _ = shared_demo(tmp_path_factory)
    project = copy_of(shared, tmp_path_factory.mktemp("inputs") / "project")
    funnel = yaml.safe_load((project / "data/metrics/funnel.json").read_text())

    drop_last_row(project / "demo/metadata/part-00001.parquet")
    project.laionbuild("compose", *FAST, *RECIPE, "select.min_clip_similarity=0.1")
    status = project.status_reasons()
    assert status["fetch@1"] == ("stale", "file: demo/metadata/part-00001.parquet"), status
    assert status["fetch@0"] == ("built", "")
    assert status["select"] == ("stale", "params: select.min_clip_similarity")
    edited = project.build(*RECIPE)
    assert edited.checked and {"fetch@1", "prepare@1", "dedup"} <= set(edited.ran)
    assert not {r for r in edited.ran if r.endswith("@0")}, edited.ran
    after = yaml.safe_load((project / "data/metrics/funnel.json").read_text())
    assert after["rows_in"] == funnel["rows_in"] - 1

    weights = project.path.parent / "heads" / "brightness.npz"
    head = [f"+tag.heads.brightness={{kind:linear,path:'{weights}'}}"]
    # (up to the stage under test: what follows the tags is checked by the edited-part build above)
    skipped = project.build(*RECIPE, *head, "--stage", "tag")
    assert {"tag@0", "tag@1"} <= set(skipped.ran)
    assert "brightness" not in pq.read_schema(project / "data/tags/part_0/tags.parquet").names
    weights.parent.mkdir()
    np.savez(weights, W0=np.ones((32, 1), np.float32), b0=np.zeros(1, np.float32))
    assert project.status_reasons()["tag@0"] == ("stale", f"file: {weights}")
    appeared = project.build(*RECIPE, *head, "--stage", "tag")
    assert {"tag@0", "tag@1"} <= set(appeared.ran) and not {"embed@0", "download@0"} & set(appeared.ran)
    assert "brightness" in pq.read_schema(project / "data/tags/part_1/tags.parquet").names

    from laionbuild.models.face_detectors import haar_cascade_path

    cascade = project.path.parent / "cascade.xml"  # the face detector's weights (opencv_haar: a cascade)
    shutil.copy(haar_cascade_path(), cascade)
    faces = [f"tag.faces.weights={cascade}"]
    assert {"faces@0", "faces@1"} <= set(project.build(*RECIPE, *head, *faces, "--stage", "faces").ran)
    declaration, rest = cascade.read_text().split("\n", 1)
    cascade.write_text(f"{declaration}\n<!-- edited: another cascade -->\n{rest}")
    assert project.status_reasons()["faces@1"] == ("stale", f"file: {cascade}")
    edited_cascade = project.build(*RECIPE, *head, *faces, "--stage", "faces")
    assert {"faces@0", "faces@1"} <= set(edited_cascade.ran) and "download@0" not in edited_cascade.ran

    import torch

    checkpoint = project.path.parent / "tiny.pt"
    shutil.copy(next((project / "data/.work/models").glob("laionbuild-tiny-random-seed0.pt")), checkpoint)
    local = [o for o in FAST if not o.startswith("embed.pretrained=")] + [f"embed.pretrained={checkpoint}"]
    project.laionbuild("build", *local, *RECIPE, *head, *faces, "--stage", "tag")
    md5 = yaml.safe_load((project / "data/embed/part_0/model.json").read_text())["checkpoint_md5"]
    state = torch.load(checkpoint)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, checkpoint)
    assert project.status_reasons()["embed@1"] == ("stale", f"file: {checkpoint}")
    rewritten = project.laionbuild("build", *local, *RECIPE, *head, *faces, "--stage", "tag")
    assert {"embed@0", "embed@1", "tag@0"} <= set(rewritten.ran) and "download@0" not in rewritten.ran
    assert yaml.safe_load((project / "data/embed/part_0/model.json").read_text())["checkpoint_md5"] != md5


def test_the_face_detector_auto_resolves_to_and_its_weights_are_recorded(tmp_path, monkeypatch):
    from laionbuild.models.face_detectors import haar_cascade_path, retinaface_available

    weights = tmp_path / "retinaface.pth"
    configs = {name: compose([f"tag.faces.detector={name}", f"tag.faces.weights={weights}"], conf_dir=ROOT / "conf")
               for name in ("none", "auto", "retinaface")}
    monkeypatch.chdir(tmp_path)

    def faces(name: str) -> dict:
        return expected(configs[name])["faces.json"]

    assert faces("none") == {"detector": "none", "inputs": {}}
    cascade = haar_cascade_path()
    assert faces("auto") == {"detector": "opencv_haar", "inputs": {str(cascade): {
        "size": cascade.stat().st_size, "md5": hashlib.md5(cascade.read_bytes()).hexdigest()}}}
    assert faces("retinaface")["inputs"] == {str(weights): {"missing": True}}
    weights.write_bytes(b"retinaface weights v1")
    resolved = "retinaface" if retinaface_available() else "opencv_haar"
    assert faces("auto")["detector"] == resolved  # the weights appeared: auto now means retinaface
    first = faces("retinaface")["inputs"][str(weights)]
    assert first == {"size": 21, "md5": hashlib.md5(b"retinaface weights v1").hexdigest()}
    weights.write_bytes(b"retinaface weights v2")
    assert faces("retinaface")["inputs"][str(weights)]["md5"] != first["md5"]
    assert consumers("faces.json", [0, 1]) == ["faces@0", "faces@1"]


def test_a_remote_list_is_fetched_once_per_version_not_once_per_part(tmp_path):
    """prepare.caption_word_list on a store: three parts' prepare read one local copy of the
    recorded version (data/.work/inputs/); a republished list is fetched once more, and every
    part's prepare reruns."""
    store = tmp_path / "store"
    (store / "metadata").mkdir(parents=True)
    for part in (0, 1, 2):
        shutil.copy(ROOT / f"demo/metadata/part-{part:05d}.parquet", store / "metadata")
    (store / "words.txt").write_text("cat\ndog\n")
    project = new_project(tmp_path / "project")
    with FolderServer(store) as server:
        recipe = [*FAST, f"source.base_url={server.url}/metadata", "source.num_parts=3", "subset.parts=[0,1,2]",
                  f"prepare.caption_word_list={server.url}/words.txt"]
        first = project.laionbuild("build", "--stage", "dedup", *recipe)
        assert {"prepare@0", "prepare@1", "prepare@2"} <= set(first.ran)
        assert server.gets["/words.txt"] == 1, server.gets
        (store / "words.txt").write_text("cat\ndog\nbird\n")
        second = project.laionbuild("build", "--stage", "dedup", *recipe)
        assert {"prepare@0", "prepare@1", "prepare@2"} <= set(second.ran) and "fetch@0" not in second.ran
        assert server.gets["/words.txt"] == 2, server.gets


def test_a_list_changed_after_the_inputs_check_is_refused_not_read(tmp_path, monkeypatch):
    from laionbuild.project.inputs import local_copy, remote_fingerprint
    from laionbuild.recipe.errors import InputError

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    (store / "words.txt").write_text("cat\n")
    with FolderServer(store) as server:
        url = f"{server.url}/words.txt"
        (tmp_path / "data/inputs").mkdir(parents=True)
        (tmp_path / "data/inputs/word_list.json").write_text(json.dumps({"inputs": {url: remote_fingerprint(url)}}))
        for republished in ("cat\ndog\n", "dog\n"):  # between the check and the stage; the second the same size
            (store / "words.txt").write_text(republished)
            with pytest.raises(InputError, match=r"prepare.caption_word_list: the file changed after the inputs check"):
                local_copy(url, "word_list.json", "prepare.caption_word_list")
        assert not [p for p in (tmp_path / "data/.work/inputs").rglob("*") if p.is_file() and p.name == "words.txt"]
        (store / "words.txt").write_text("cat\n")  # the recorded version again: read, and kept
        assert local_copy(url, "word_list.json", "prepare.caption_word_list").read_text() == "cat\n"
