"""Nothing built is lost: `compose` removes a dropped part's output only when DVC's cache holds
it as it is, and two builds sharing one `download.shards_url` never write into one prefix at once
(laionbuild/shards/lease.py)."""

from __future__ import annotations

import json

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
    assert again.executed == [], again.executed
    assert (project / "data/raw/part_1").is_dir()
    # dropped again (now held as it is): removed, not kept a second time
    project.laionbuild("compose", *FAST, "subset.parts=[0]")
    assert not (project / "data/raw/part_1").exists() and not (project / "data/.kept/raw/part_1.1").exists()


def _lease_prefixes(s3, tmp_path) -> list[str]:
    from .conftest import S3_BUCKET

    return [str(tmp_path / "shards" / "part_0-00000000000000aa"), f"file://{tmp_path}/mount/part_0-00000000000000bb",
            f"s3://{S3_BUCKET}/lease-{tmp_path.name}/part_0-00000000000000cc"]


def test_lease_one_writer_at_a_time(s3, tmp_path, monkeypatch):
    """The first writer holds the prefix; a second waits, then takes the completed prefix as it is."""
    import threading

    from laionbuild.shards import lease
    from laionbuild.shards.storage import COMPLETE, filesystem, join

    monkeypatch.setattr(lease, "POLL_S", 0.1)
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.2)
    for prefix in _lease_prefixes(s3, tmp_path):
        fs, root = filesystem(prefix)

        def done(fs=fs, root=root) -> bool:
            fs.invalidate_cache()
            return fs.exists(f"{root}/{COMPLETE}")

        second: list = []
        with lease.writer(prefix, done) as first:
            assert not first.complete and first.generation == 1
            waiting = threading.Thread(target=lambda second=second, prefix=prefix, done=done:
                                       second.append(_hold(lease, prefix, done)))
            waiting.start()
            waiting.join(1.5)  # (several heartbeats and polls)
            assert waiting.is_alive() and not second, prefix  # waits while the first writes
            assert lease.live_holder(prefix)["owner"] == first.owner
            first.check()
            fs.pipe_file(join(root, COMPLETE), b"{}")
        waiting.join(10)
        assert second == [True], prefix  # the second took the complete prefix, holding nothing
        assert lease.leases(prefix) == {} and lease.live_holder(prefix) is None


def _hold(lease, prefix, done) -> bool:
    with lease.writer(prefix, done) as held:
        return held.complete


def test_stale_leases_are_taken_over_and_a_taken_over_writer_stops(s3, tmp_path, monkeypatch):
    import json
    import socket
    import subprocess
    import sys
    import time

    from laionbuild.shards import lease
    from laionbuild.shards.storage import filesystem, join

    monkeypatch.setattr(lease, "POLL_S", 0.1)
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.2)  # (an old stamp counts once seen unchanged for two beats)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname()
    for prefix in _lease_prefixes(s3, tmp_path):
        fs, root = filesystem(prefix)
        fs.makedirs(root, exist_ok=True)

        def put(generation: int, fs=fs, root=root, **holder) -> None:
            fs.pipe_file(join(root, lease.lease_name(generation)), json.dumps(holder).encode())

        # a build killed on this host (its process is gone), then one killed on another machine an
        # hour ago: each lease is taken over at once, by the next generation
        put(1, host=host, pid=dead_pid, heartbeat=time.time(), owner="killed-here")
        with lease.writer(prefix, lambda: False) as held:
            assert not held.complete and held.generation == 2 and sorted(lease.leases(prefix)) == [2]
        put(3, host="elsewhere", pid=1, heartbeat=time.time() - 3600, owner="killed-there")
        with lease.writer(prefix, lambda: False) as held:
            assert held.generation == 4
            # a writer whose lease was taken over (it looked dead) refuses to mark the prefix complete
            put(5, host="elsewhere", pid=1, heartbeat=time.time(), owner="taker")
            try:
                held.check()
            except lease.LeaseLost as exc:
                assert "took over" in str(exc)
            else:
                raise AssertionError("check() passed after a takeover")
        fs.rm(join(root, lease.lease_name(5)))

    # a holder that finds a later generation at its heartbeat stops at once, with its child processes
    prefix = _lease_prefixes(s3, tmp_path)[0]
    script = (f"import subprocess, sys, time\nfrom laionbuild.shards import lease\nlease.HEARTBEAT_S = 0.2\n"
              f"with lease.writer({prefix!r}, lambda: False):\n"
              f"    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"    print(child.pid, flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(holder.stdout.readline())
    [generation] = lease.leases(prefix)
    fs, root = filesystem(prefix)
    fs.pipe_file(join(root, lease.lease_name(generation + 1)), b'{"host": "elsewhere", "pid": 1, "heartbeat": 0}')
    assert holder.wait(10) == -9
    import psutil

    deadline = time.time() + 5
    while psutil.pid_exists(child_pid) and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the holder's child still runs"
        time.sleep(0.1)


def test_exclusive_create_has_one_winner(s3, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from laionbuild.shards import lease

    for prefix in _lease_prefixes(s3, tmp_path):
        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(lambda i, prefix=prefix: lease._create(prefix, lease.lease_name(1), str(i).encode()), range(8)))
        assert won.count(True) == 1, (prefix, won)


def test_a_released_lease_keeps_its_number_and_only_its_owner_holds_it(s3, tmp_path, monkeypatch):
    """A holder that fails (its prefix incomplete) leaves its lease marked released, so the next
    writer takes it at once with the next number; a lease of one's own number but another owner
    (the prefix deleted meanwhile, the number taken again) is not one's own: check() refuses, and
    leaving does not touch it."""
    import threading
    import time

    from laionbuild.shards import lease
    from laionbuild.shards.storage import filesystem, join

    monkeypatch.setattr(lease, "POLL_S", 0.1)
    for prefix in _lease_prefixes(s3, tmp_path):
        fs, root = filesystem(prefix)
        with lease.writer(prefix, lambda: False) as first:
            assert first.generation == 1
        [(number, path)] = lease.leases(prefix).items()
        assert number == 1 and lease.read(prefix, path)["released"] is True
        assert lease.read(prefix, path)["owner"] == first.owner and lease.live_holder(prefix) is None

        taken: list = []
        taker = threading.Thread(target=lambda taken=taken, prefix=prefix: taken.append(_generation(lease, prefix)))
        taker.start()
        taker.join(10)  # (a live lease would keep it waiting: POLL_S after POLL_S)
        assert taken == [2], (prefix, taken)  # the next number, never 1 again

        with lease.writer(prefix, lambda: False) as held:
            assert held.generation == 3
            # the prefix's leases deleted (gc-shards, a user) and number 3 taken by another build
            fs.rm(join(root, lease.lease_name(3)))
            other = dict(owner="other-build", host="elsewhere", pid=1, heartbeat=time.time())
            fs.pipe_file(join(root, lease.lease_name(3)), json.dumps(other).encode())
            assert not held.holds()
            try:
                held.check()
            except lease.LeaseLost as exc:
                assert "took over" in str(exc)
            else:
                raise AssertionError("check() passed with another owner's lease of the same number")
        assert lease.read(prefix, join(root, lease.lease_name(3))) == other, prefix  # left as the other wrote it


def test_staleness_is_judged_on_the_waiters_clock_and_this_machines_process_table(s3, tmp_path, monkeypatch):
    """A holder whose clock runs an hour ahead is taken over only once the waiter has seen its
    heartbeat unchanged for STALE_S on its own clock; a dead pid counts as dead only in this
    machine's process table (same host name, boot and pid namespace) and for the process that
    wrote the lease (its start time), not for a later one that got the same number."""
    import os
    import subprocess
    import sys
    import threading
    import time

    from laionbuild.shards import lease
    from laionbuild.shards.storage import filesystem, join

    monkeypatch.setattr(lease, "POLL_S", 0.1)
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(lease, "STALE_S", 1.0)
    for prefix in _lease_prefixes(s3, tmp_path):
        fs, root = filesystem(prefix)
        fs.makedirs(root, exist_ok=True)
        ahead = dict(owner="clock-ahead", host="elsewhere", pid=1, heartbeat=time.time() + 3600)
        fs.pipe_file(join(root, lease.lease_name(1)), json.dumps(ahead).encode())
        assert not lease.stale(ahead, unchanged_for=0.5)  # (seen unchanged for less than STALE_S)
        taken: list = []
        taker = threading.Thread(target=lambda taken=taken, prefix=prefix: taken.append(_generation(lease, prefix)))
        taker.start()
        taker.join(15)
        assert taken == [2], (prefix, taken)

    here = lease._this_machine()
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout)
    beat = time.time()
    assert lease.stale(dict(here, pid=dead_pid, heartbeat=beat), unchanged_for=0)
    other_namespace = dict(here, pid_ns="pid:[1]" if here["pid_ns"] != "pid:[1]" else "pid:[2]")
    assert not lease.stale(dict(other_namespace, pid=dead_pid, heartbeat=beat), unchanged_for=0)
    assert not lease.stale(dict(here, boot_id="another-boot", pid=dead_pid, heartbeat=beat), unchanged_for=0)
    started = lease._started()
    assert not lease.stale(dict(here, pid=os.getpid(), pid_started=started, heartbeat=beat), unchanged_for=0)
    assert lease.stale(dict(here, pid=os.getpid(), pid_started=started - 100, heartbeat=beat), unchanged_for=0)


def _generation(lease, prefix) -> int:
    with lease.writer(prefix, lambda: False) as held:
        return held.generation


def _holder_script(prefix: str, **settings) -> str:
    assigned = "".join(f"lease.{k} = {v!r}\n" for k, v in settings.items())
    return ("import logging, subprocess, sys, time\nfrom laionbuild.shards import lease\nlogging.basicConfig()\n"
            f"{assigned}with lease.writer({prefix!r}, lambda: False) as held:\n"
            "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "    print(held.generation, held.owner, child.pid, flush=True)\n    time.sleep(60)\n")


def _assert_stopped(holder, child_pid: int) -> str:
    import time

    import psutil

    assert holder.wait(30) == -9
    deadline = time.time() + 5
    while psutil.pid_exists(child_pid) and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the holder's child still runs"
        time.sleep(0.1)
    return holder.stderr.read()


def test_a_holder_stops_when_its_number_has_another_owner_or_it_cannot_renew(s3, tmp_path):
    """At its heartbeat, a holder whose lease number now belongs to another owner stops at once
    with its child processes; so does one whose store refuses every renewal for STALE_S / 2
    (here a prefix made unreadable: a symbolic link to itself)."""
    import subprocess
    import sys
    import time

    from laionbuild.shards import lease
    from laionbuild.shards.storage import filesystem, join

    prefix = _lease_prefixes(s3, tmp_path)[2]  # (S3)
    holder = subprocess.Popen([sys.executable, "-c", _holder_script(prefix, HEARTBEAT_S=0.2)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    generation, owner, child_pid = holder.stdout.readline().split()
    fs, root = filesystem(prefix)
    fs.pipe_file(join(root, lease.lease_name(int(generation))),
                 json.dumps(dict(owner="reused-number", host="elsewhere", pid=1, heartbeat=time.time())).encode())
    assert "taken over" in _assert_stopped(holder, int(child_pid))

    local = tmp_path / "unreadable" / "part_0-00000000000000dd"
    holder = subprocess.Popen([sys.executable, "-c", _holder_script(str(local), HEARTBEAT_S=0.1, STALE_S=2.0)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, _, child_pid = holder.stdout.readline().split()
    local.rename(local.with_name("moved-away"))
    local.symlink_to(local)  # every listing now fails: "Too many levels of symbolic links"
    stderr = _assert_stopped(holder, int(child_pid))
    assert "could not renew its lease for 1 s" in stderr and "retrying" in stderr, stderr


def test_a_lease_created_in_a_race_s3_answers_409_or_a_bare_412_is_looked_at_again(tmp_path):
    """Real S3 answers a conditional put racing another on the same key with 409
    ConditionalRequestConflict, and S3-compatible stores often answer a lost one with a 412 that
    does not name the condition; s3fs raises neither as FileExistsError. moto answers neither, so
    a server on 127.0.0.1 answers each put as those stores do, and s3fs talks to it for real."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import s3fs

    from laionbuild.shards import lease

    from .conftest import environment

    answers = [(409, "ConditionalRequestConflict"), (412, "PreconditionFailed")]
    seen: list = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_PUT(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append((self.path, self.headers.get("If-None-Match")))
            status, code = answers[len(seen) - 1]
            body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{code}</Message>"
                    "</Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with environment(AWS_ENDPOINT_URL=f"http://127.0.0.1:{server.server_address[1]}", AWS_ACCESS_KEY_ID="test",
                     AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1"):
            s3fs.S3FileSystem.clear_instance_cache()
            for _ in answers:
                assert lease._create("s3://race/part_0-00000000000000ee", lease.lease_name(1), b"{}") is False
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.shutdown()
        server.server_close()
    assert seen == [("/race/part_0-00000000000000ee/_laionbuild_lease-00000001", "*")] * 2


def test_two_clones_building_at_once_write_one_prefix_once(s3, tmp_path, monkeypatch):
    """Two clones (two sweep points sharing their download) build part 0 on one shards_url at the
    same moment: one downloads, the other waits for it and takes the complete prefix; every shard
    object in the (versioned) bucket was written once, and both builds read complete shards."""
    import subprocess
    import threading
    import time

    from laionbuild.recipe.schema import load_params
    from laionbuild.shards import lease
    from laionbuild.shards.storage import COMPLETE, part_shards, shards_prefix

    from .conftest import BIN, S3_BUCKET, build_env, new_project

    fs, _ = s3
    url = f"s3://{S3_BUCKET}/concurrent"
    common = [*FAST, "subset.parts=[0]", f"download.shards_url={url}"]
    clones = [new_project(tmp_path / "a", cache="own"), new_project(tmp_path / "b", cache="own")]
    points = [[], ["select.min_clip_similarity=0.01"]]  # distinct experiments, one download
    for clone, point in zip(clones, points):
        clone.build(*common[len(FAST):], *point, "--stage", "dedup")
    monkeypatch.chdir(clones[0].path)
    prefix = shards_prefix(load_params("params.yaml"), 0)

    # the test holds the prefix's lease while both builds start, so that both reach it at once
    outputs: list[list[str]] = [[], []]
    with lease.writer(prefix, lambda: False):
        procs = [subprocess.Popen([str(BIN / "laionbuild"), "build", "--stage", "download@0", *common, *point],
                                  cwd=clone.path, env=build_env(), text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) for clone, point in zip(clones, points)]
        readers = [threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True)
                   for p, out in zip(procs, outputs)]
        for reader in readers:
            reader.start()
        deadline = time.time() + 600
        while not all(any("is being written by" in line for line in out) for out in outputs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "".join(sum(outputs, []))[-4000:]
            time.sleep(0.5)
    for p, reader in zip(procs, readers):
        p.wait(900)
        reader.join()
    texts = ["".join(out) for out in outputs]
    assert [p.returncode for p in procs] == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    # one build took the lease and downloaded; the other waited for it, then took the prefix as it is
    assert sum("taken as it is" in t for t in texts) == 1, texts

    manifests = [json.loads((c / "data/images/part_0/shards.json").read_text()) for c in clones]
    assert manifests[0] == manifests[1] and manifests[0]["url"] == prefix and manifests[0]["shards"]
    root = prefix.removeprefix("s3://")
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, refresh=True)}
    assert COMPLETE in names and not any(lease.LEASE.match(n) for n in names)
    assert [n for n in fs.ls(f"{S3_BUCKET}/concurrent", refresh=True)] == [root]  # one prefix
    written = _versions_written(fs, root)
    assert written and set(written.values()) == {1}, written  # each shard object written once, by one writer
    for clone in clones:
        assert len(part_shards(clone / "data/images/part_0")) == len(manifests[0]["shards"])


def test_gc_shards_keeps_a_prefix_being_written(s3, project):
    """A prefix with a live lease (a download running, here or in another clone) is kept even by
    `gc-shards --delete --incomplete`; one whose lease holder is dead is collected."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from laionbuild.shards import lease

    from .conftest import S3_BUCKET

    fs, _ = s3
    base = f"{S3_BUCKET}/gc-lease"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    for name, pid in (("part_0-00000000000000a1", os.getpid()), ("part_0-00000000000000d2", dead)):
        fs.pipe(f"{base}/{name}/00000.tar", b"a shard being written")
        holder = {"host": socket.gethostname(), "pid": pid, "heartbeat": time.time(), "owner": name[-2:]}
        fs.pipe(f"{base}/{name}/{lease.lease_name(1)}", json.dumps(holder).encode())
    listed = project.laionbuild("gc-shards", "--url", f"s3://{base}", "--delete", "--incomplete").output
    assert f"part_0-00000000000000a1  kept: being written (lease of {socket.gethostname()} pid {os.getpid()}" in listed
    assert "deleted 1 prefix" in listed
    fs.invalidate_cache()
    assert {p.split("/")[2] for p in fs.find(base)} == {"part_0-00000000000000a1"}


def test_queued_experiments_run_at_once_write_one_prefix_once(s3, tmp_path, monkeypatch):
    """`dvc exp run --queue` twice (two points sharing their download), `dvc queue start -j2`: both
    experiments reach part 0's prefix at once (the test holds its lease until both wait for it);
    one downloads, the other takes the complete prefix; each shard object is written once."""
    import subprocess
    import sys
    import time

    from laionbuild.recipe.schema import load_params
    from laionbuild.shards import lease
    from laionbuild.shards.storage import COMPLETE, shards_prefix

    from .conftest import S3_BUCKET, Project, build_env

    fs, _ = s3
    Project(tmp_path).laionbuild("init", str(tmp_path / "ds"))
    repo = Project(tmp_path / "ds")
    common = [*FAST, "subset.parts=[0]", f"download.shards_url=s3://{S3_BUCKET}/queue"]
    repo.laionbuild("build", "--stage", "dedup", *common)  # (the same dedup as the experiments': its prefix)
    monkeypatch.chdir(repo.path)
    prefix = shards_prefix(load_params("params.yaml"), 0)
    repo.run("git", "checkout", "--", "params.yaml")
    names = ["point-a", "point-b"]
    for name, threshold in zip(names, ("0.0", "0.01")):
        repo.dvc("exp", "run", "--queue", "-n", name, *[a for o in common for a in ("-S", o)],
                 "-S", f"select.min_clip_similarity={threshold}", "download@0")

    def logs(name: str) -> str:
        return repo.dvc("queue", "logs", name, check=False).output

    with lease.writer(prefix, lambda: False):
        # (in the background: the queue's workers keep `dvc queue start`'s output open until they end)
        subprocess.Popen([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], cwd=repo.path, env=build_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(120)
        deadline = time.time() + 600
        while not all("is being written by" in logs(n) for n in names):
            assert time.time() < deadline, [logs(n)[-3000:] for n in names]
            time.sleep(2)
    deadline = time.time() + 600
    while (status := repo.dvc("queue", "status").output) and ("Queued" in status or "Running" in status):
        assert time.time() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 2, status
    texts = [logs(n) for n in names]
    assert sum("taken as it is" in t for t in texts) == 1, texts  # one downloaded, one took its prefix

    root = prefix.removeprefix("s3://")
    assert [p for p in fs.ls(f"{S3_BUCKET}/queue", refresh=True)] == [root]
    assert not any(lease.LEASE.match(p.rsplit("/", 1)[-1]) for p in fs.ls(root, refresh=True))
    written = _versions_written(fs, root)
    assert COMPLETE in written and set(written.values()) == {1}, written


def _versions_written(fs, root: str) -> dict[str, int]:
    """Shard object (tar, parquet, stats, completion marker) under `root` -> how many versions of it
    the versioned bucket holds: 1 each when one writer wrote the prefix."""
    from laionbuild.shards.storage import COMPLETE

    from .conftest import S3_BUCKET

    versions = fs.call_s3("list_object_versions", Bucket=S3_BUCKET, Prefix=root.split("/", 1)[1] + "/")
    written: dict[str, int] = {}
    for v in versions.get("Versions", []):
        name = v["Key"].rsplit("/", 1)[-1]
        if name.endswith((".tar", ".parquet", "_stats.json")) or name == COMPLETE:
            written[name] = written.get(name, 0) + 1
    return written
