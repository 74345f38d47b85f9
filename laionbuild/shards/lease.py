"""One writer per prefix under `download.shards_url`: a lease.

Two builds can want the same prefix at once (the points of a `dvc queue start -j2` sweep that
share their download, two clones of one repo): the prefix is named by the download's input and
settings, so both would write img2dataset's shards into it, and a prefix could end with one
writer's tar beside the other's parquet. Before writing, the download takes the prefix's lease:

- a lease is an object `<prefix>/_laionbuild_lease-<generation>` (JSON: owner, host, pid,
  heartbeat time) that only one writer can create: an S3 conditional put (`If-None-Match: *`),
  a hard link on a local path or shared mount (atomic on NFS too), fsspec's `mode="create"` on
  other stores (as atomic as the store makes it). The holder rewrites it every HEARTBEAT_S, writes
  the completion marker (`_laionbuild_complete.json`), then deletes it (nobody writes a complete
  prefix again); a holder that fails marks it released instead (rewritten with `released: true`),
  so that the next writer takes the next number. The holder and `check()` compare the newest
  lease's owner as well as its number, so a number taken again (a prefix deleted meanwhile) is
  never mistaken for one's own;
- a second writer waits (polling every POLL_S) until the prefix is complete, then takes it as it
  is, downloading nothing; or until the lease is released without the marker (the holder failed),
  or stale: its holder is a dead process on this host (same host name, boot and pid namespace),
  or its heartbeat has not changed for STALE_S by the waiter's own clock (a build killed on
  another machine; the two machines' clocks are never compared, except that a heartbeat stamped
  more than 3 × STALE_S ago is stale at once). It then creates the next generation, which only
  one taker can, and resumes the download in the prefix as a killed build's rerun does
  (img2dataset's incremental mode keeps the finished shards);
- a holder that finds the newest lease is not its own (a later generation, or its number taken
  by another owner after the prefix was deleted: it looked dead for STALE_S, a suspended machine,
  a long network partition), or that could not renew its lease for STALE_S / 2, stops at once,
  its download processes with it, so two writers never write on; its build fails and says why.

Cost per part: one listing, one conditional put, one read and one put more per download, and one
listing, one read and one put per HEARTBEAT_S while it runs; a waiting build one existence check per POLL_S.
`laionbuild gc-shards` keeps a prefix with a live lease even with `--incomplete`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from laionbuild.shards.storage import filesystem, is_url, join, local_path

log = logging.getLogger(__name__)

LEASE = re.compile(r"^_laionbuild_lease-(\d+)$")  # (not *.json: img2dataset's resume reads those as shard stats)
HEARTBEAT_S = 30.0
STALE_S = 600.0
POLL_S = 5.0


class LeaseLost(RuntimeError):
    pass


def lease_name(generation: int) -> str:
    return f"_laionbuild_lease-{generation:08d}"


def leases(prefix: str) -> dict[int, str]:
    """generation -> path (within the prefix's filesystem) of the lease objects in `prefix`."""
    fs, root = filesystem(prefix)
    fs.invalidate_cache(root)
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return {}
    return {int(m.group(1)): path for path in names if (m := LEASE.match(path.rstrip("/").rsplit("/", 1)[-1]))}


def read(prefix: str, path: str) -> dict | None:
    fs, _ = filesystem(prefix)
    try:
        return json.loads(fs.cat_file(path))  # (one GET: a heartbeat may replace the object meanwhile)
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # (never written half: a put and a link are whole) unreadable: stale


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _this_machine() -> dict:
    """Where a pid means this process table: containers often share a host name."""
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_namespace()}


def _local(holder: dict) -> bool:
    """The holder's pid is one of this process table: same host name, boot and pid namespace
    (a lease written before boot_id/pid_ns were recorded is judged by its host name alone)."""
    here = _this_machine()
    return holder.get("host") == here["host"] and all(holder.get(k, here[k]) == here[k] for k in ("boot_id", "pid_ns"))


def stale(holder: dict, now: float | None = None, unchanged_for: float = 0.0) -> bool:
    """A lease nobody holds: released, its holder a dead process here, its heartbeat unchanged for
    STALE_S as the caller observed it (`unchanged_for`, on the caller's own clock), or stamped
    more than 3 × STALE_S ago (a lease abandoned long before anyone looked)."""
    if not holder or "heartbeat" not in holder or holder.get("released"):
        return True
    if _local(holder) and not _alive(int(holder.get("pid", 0))):
        return True
    if unchanged_for > STALE_S:
        return True
    return (time.time() if now is None else now) - float(holder["heartbeat"]) > 3 * STALE_S


def live_holder(prefix: str) -> dict | None:
    """The holder of the prefix's newest lease while it is live (gc-shards), else None. (One look:
    a heartbeat stamped within 3 × STALE_S counts as live.)"""
    found = leases(prefix)
    if not found:
        return None
    holder = read(prefix, found[max(found)])
    return holder if holder and not stale(holder) else None


def _create(prefix: str, name: str, data: bytes) -> bool:
    """Create `prefix/name` unless it exists: True when this call created it."""
    if not is_url(prefix):
        root = local_path(prefix)
        os.makedirs(root, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lease.", dir=root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.link(tmp, os.path.join(root, name))
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    fs, root = filesystem(prefix)
    try:
        fs.pipe_file(f"{root.rstrip('/')}/{name}", data, mode="create")
        return True
    except FileExistsError:  # S3's 412 PreconditionFailed (If-None-Match): it exists
        return False
    except OSError as exc:
        if _lost_race(exc):
            return False
        raise


# S3 answers a conditional put that races another on the same key with 409
# ConditionalRequestConflict (the other may or may not win), and one that lost with 412
# PreconditionFailed; s3fs raises the first as a plain OSError (EIO), and the second as
# FileExistsError only when the answer names the If-None-Match condition (S3-compatible stores
# often leave it out: then OSError EINVAL). Either way: look again.
_RACE_CODES = {"ConditionalRequestConflict", "PreconditionFailed", "409", "412"}


def _lost_race(exc: OSError) -> bool:
    response = getattr(exc.__cause__, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code in _RACE_CODES or status in (409, 412)


def _overwrite(prefix: str, name: str, data: bytes) -> None:
    if not is_url(prefix):
        from pathlib import Path

        from laionbuild.project.atomic import atomic_write_bytes

        atomic_write_bytes(Path(local_path(prefix)) / name, data)
        return
    fs, root = filesystem(prefix)
    fs.pipe_file(f"{root.rstrip('/')}/{name}", data)


def _remove(prefix: str, path: str) -> None:
    fs, _ = filesystem(prefix)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


@dataclass
class Lease:
    """What `writer` yields: `complete` (the prefix is complete: take it as it is, write nothing),
    else this process holds the lease until the context ends."""

    prefix: str
    complete: bool
    generation: int = 0
    owner: str = ""
    lost: str | None = None

    def check(self) -> None:
        """Raise if the lease was taken over (call before marking the prefix complete)."""
        if self.lost:
            raise LeaseLost(self.lost)
        if self.generation and not self.holds():
            raise LeaseLost(f"{self.prefix}: another build took over this prefix's lease; rerun the build")

    def holds(self) -> bool:
        """The prefix's newest lease is this one: its number and its owner (a number can be taken
        again by another owner once the prefix was deleted)."""
        found = leases(self.prefix)
        top = max(found, default=0)
        return top == self.generation and (read(self.prefix, found[top]) or {}).get("owner") == self.owner


@contextmanager
def writer(prefix: str, complete: Callable[[], bool], describe: str = "") -> Iterator[Lease]:
    """Hold `prefix`'s lease while the context runs, waiting for a live holder first; yields a
    Lease whose `complete` is True (nothing held) when the prefix is or becomes complete."""
    owner = uuid.uuid4().hex[:12]
    waited_on = None
    seen: tuple | None = None  # (generation, owner, heartbeat) of the newest lease, and since when (monotonic)
    seen_since = 0.0
    while True:
        if complete():
            if waited_on:
                log.info("%s: complete (written by %s), taken as it is", prefix, waited_on)
            yield Lease(prefix, True)
            return
        found = leases(prefix)
        top = max(found, default=0)
        holder = read(prefix, found[top]) if top else None
        if top and holder is None:
            time.sleep(min(POLL_S, 1.0))
            continue  # taken over between the listing and the read: look again
        state = (top, (holder or {}).get("owner"), (holder or {}).get("heartbeat"))
        if state != seen:
            seen, seen_since = state, time.monotonic()
        if top and not stale(holder, unchanged_for=time.monotonic() - seen_since):
            who = f"{holder.get('host')} pid {holder.get('pid')} ({holder.get('owner')})"
            if who != waited_on:
                log.warning("%s is being written by %s%s; waiting for it to finish", prefix, who,
                            f" for {holder['describe']}" if holder.get("describe") else "")
                waited_on = who
            time.sleep(POLL_S)
            continue
        generation = top + 1
        record = {"owner": owner, **_this_machine(), "pid": os.getpid(), "generation": generation,
                  "started": time.time(), "describe": describe}
        if not _create(prefix, lease_name(generation), _body(record)):
            continue  # another writer took it first: look again
        if top and not holder.get("released"):
            log.warning("%s: took over the lease of %s (dead, or no heartbeat for %.0f s)", prefix,
                        f"{holder.get('host')} pid {holder.get('pid')}" if holder else "an unreadable lease", STALE_S)
        for old, path in found.items():
            if old < generation:
                _remove(prefix, path)
        break
    lease = Lease(prefix, False, generation, owner)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lease, record, stop), daemon=True, name="shards-lease")
    try:
        if complete():  # completed by the holder that released just before our lease
            lease.complete = True
        else:
            beat.start()
        yield lease
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()
        try:
            path = join(filesystem(prefix)[1], lease_name(generation))
            if (read(prefix, path) or {}).get("owner") == owner:  # (never another build's lease of that number)
                if complete():  # nobody writes a complete prefix again: leave it clean
                    _remove(prefix, path)
                else:  # released, not deleted: the next writer takes the next number, not this one
                    _overwrite(prefix, lease_name(generation), _body(dict(record, released=True)))
        except Exception as exc:  # (never hide the build's own error) the lease goes stale by itself
            log.warning("%s: could not release the lease (%s); it is taken over once stale", prefix, exc)


def _body(record: dict) -> bytes:
    return (json.dumps(dict(record, heartbeat=time.time()), indent=2) + "\n").encode()


def _heartbeat(lease: Lease, record: dict, stop: threading.Event) -> None:
    name = lease_name(lease.generation)
    renewed = time.monotonic()
    while not stop.wait(HEARTBEAT_S):
        try:
            if not lease.holds():
                _lose(lease, f"{lease.prefix}: this build's lease was taken over or removed while it wrote (it "
                             f"looked dead for {STALE_S:.0f} s, or gc-shards --incomplete deleted the prefix); "
                             "stopped so that two builds never write one prefix: rerun the build")
                return
            _overwrite(lease.prefix, name, _body(record))
            renewed = time.monotonic()
        except Exception as exc:  # the store unreachable for a while: retry at the next beat (never die silently)
            if time.monotonic() - renewed > STALE_S / 2:
                # another build may judge the lease stale soon: stop before it could take over
                _lose(lease, f"{lease.prefix}: this build could not renew its lease for {STALE_S / 2:.0f} s "
                             f"({exc}); stopped so that two builds never write one prefix: rerun the build")
                return
            log.warning("%s: lease heartbeat failed (%s); retrying", lease.prefix, exc)


def _lose(lease: Lease, why: str) -> None:
    lease.lost = why
    log.error("%s", why)
    _stop_writing()


def _stop_writing() -> None:
    """This process and the download processes it started stop at once."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    os.kill(os.getpid(), signal.SIGKILL)
