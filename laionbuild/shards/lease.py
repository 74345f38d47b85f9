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
  its download processes with it; its build fails and says why. A watchdog thread enforces the
  STALE_S / 2 deadline even while a store call hangs.

Cost per part: a listing, a conditional put and a listing more per download, a marker check, a
read and a delete (or a put, marking it released) at its end, and a listing, a read and a put per
HEARTBEAT_S while it runs; a waiting build a marker check, a listing and a read per POLL_S.
What is left: a holder that wakes from a long stall (suspended, partitioned) may write for up to
one HEARTBEAT_S before its heartbeat or watchdog sees the lease gone (the watchdog stops it at
once when the sleep itself exceeded STALE_S / 2); a conditional renewal (S3 If-Match) would
narrow that to one request. `laionbuild gc-shards` keeps a prefix with a live lease even with
`--incomplete` (it looks once: a stamp within 3 × STALE_S is live).
"""

from __future__ import annotations

import json
import logging
import os
import random
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
MAX_LOST_RACES = 50  # conditional creates refused in a row, with no lease there: the store cannot do them


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


def _alive(pid: int, started: float | None = None) -> bool:
    """Process `pid` runs here (and, given its recorded start time, is that process, not a later
    one that took the same number)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if started is not None and abs(process.create_time() - float(started)) > 1.0:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _started() -> float:
    import psutil

    return psutil.Process().create_time()


def _clock() -> float:
    """Seconds on a clock that neither jumps with the wall clock nor stops while the machine
    sleeps (CLOCK_BOOTTIME where there is one): a holder suspended for an hour sees the hour."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


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


def stale(holder: dict, now: float | None = None, unchanged_for: float | None = None) -> bool:
    """A lease nobody holds: released, its holder a dead process here, or its heartbeat unchanged
    for STALE_S as the caller observed it (`unchanged_for`, on the caller's own clock). A stamp
    more than 3 × STALE_S old (a lease abandoned long before anyone looked) counts once the
    caller saw it unchanged for two heartbeats (so a clock 30 minutes off alone never makes a
    live holder stale), or at once for a caller that looks only once (`unchanged_for` None)."""
    if not holder or "heartbeat" not in holder or holder.get("released"):
        return True
    if _local(holder) and not _alive(int(holder.get("pid", 0)), holder.get("pid_started")):
        return True
    if unchanged_for is not None and unchanged_for > STALE_S:
        return True
    old = (time.time() if now is None else now) - float(holder["heartbeat"]) > 3 * STALE_S
    return old and (unchanged_for is None or unchanged_for > 2 * HEARTBEAT_S)


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
    renewed: float = 0.0  # (_clock) when the last successful heartbeat round began
    failure: str = ""  # the last heartbeat error

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
    seen: tuple | None = None  # (generation, owner, heartbeat) of the newest lease, and since when (_clock)
    seen_since = 0.0
    lost_races = 0
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
            seen, seen_since = state, _clock()
        if top and not stale(holder, unchanged_for=_clock() - seen_since):
            who = f"{holder.get('host')} pid {holder.get('pid')} ({holder.get('owner')})"
            if who != waited_on:
                log.warning("%s is being written by %s%s; waiting for it to finish", prefix, who,
                            f" for {holder['describe']}" if holder.get("describe") else "")
                waited_on = who
            time.sleep(POLL_S)
            continue
        generation = top + 1
        record = {"owner": owner, **_this_machine(), "pid": os.getpid(), "pid_started": _started(),
                  "generation": generation, "started": time.time(), "describe": describe}
        if not _create(prefix, lease_name(generation), _body(record)):
            lost_races += 1  # another writer took it first: look again, after a random pause so that
            if lost_races >= MAX_LOST_RACES and not leases(prefix):  # two takers do not collide in step
                raise RuntimeError(f"{prefix}: the store refused {lost_races} conditional creates of a lease in a "
                                   "row with no lease there (it answers 409/412 to every If-None-Match put?); "
                                   "put download.shards_url on a store with conditional writes")
            time.sleep(random.uniform(0.1, min(POLL_S, 1.0)))
            continue
        if max(leases(prefix), default=0) != generation:  # (our listing was old: a later number exists)
            _remove(prefix, join(filesystem(prefix)[1], lease_name(generation)))
            continue
        if top and not holder.get("released"):
            log.warning("%s: took over the lease of %s (dead, or no heartbeat for %.0f s)", prefix,
                        f"{holder.get('host')} pid {holder.get('pid')}" if holder else "an unreadable lease", STALE_S)
        for old, path in found.items():
            if old < generation:
                _remove(prefix, path)
        break
    lease = Lease(prefix, False, generation, owner)
    lease.renewed = _clock()
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lease, record, stop), daemon=True, name="shards-lease")
    watch = threading.Thread(target=_watchdog, args=(lease, stop), daemon=True, name="shards-lease-watchdog")
    try:
        if complete():  # completed by the holder that released just before our lease
            lease.complete = True
        else:
            beat.start()
            watch.start()
        yield lease
    finally:
        stop.set()
        if watch.is_alive():
            watch.join()
        if beat.is_alive():
            beat.join(timeout=HEARTBEAT_S)  # (a store call may hang: the release below goes on)
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
    while not stop.wait(HEARTBEAT_S):
        began = _clock()
        try:
            if not lease.holds():
                _lose(lease, f"{lease.prefix}: this build's lease was taken over or removed while it wrote (it "
                             f"looked dead for {STALE_S:.0f} s, or gc-shards --incomplete deleted the prefix); "
                             "stopped so that two builds never write one prefix: rerun the build")
                return
            _overwrite(lease.prefix, name, _body(record))
            lease.renewed = began  # (the round's start: the stamp it wrote is no newer)
        except Exception as exc:  # the store unreachable for a while: retry at the next beat (never die silently)
            lease.failure = str(exc)
            log.warning("%s: lease heartbeat failed (%s); retrying", lease.prefix, exc)


def _watchdog(lease: Lease, stop: threading.Event) -> None:
    """Stop the holder once its lease went unrenewed for STALE_S / 2, whether the store's calls
    fail or hang (retries and timeouts can hold one call for minutes), before another build could
    judge it stale and take over; a machine that slept past that stops as it wakes."""
    while not stop.wait(min(1.0, HEARTBEAT_S)):
        if _clock() - lease.renewed > STALE_S / 2 and not stop.is_set():
            _lose(lease, f"{lease.prefix}: this build could not renew its lease for {STALE_S / 2:.0f} s "
                         f"({lease.failure or 'the store did not answer'}); stopped so that two builds never "
                         "write one prefix: rerun the build")
            return


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
