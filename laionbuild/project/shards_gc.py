"""`laionbuild gc-shards`: the prefixes under `download.shards_url` that no build refers to.

Every distinct input of a part's download gets its own prefix (`part_N-<fingerprint>`, see
laionbuild/shards/storage.py), so a sweep over download settings leaves one copy of the images per
point. DVC's `dvc gc` cleans its cache, which holds the manifests but not these tars: this is
their gc. Run it in the DVC project. A prefix is referenced by the manifest
(`data/images/part_N/shards.json`) of

- the workspace, and of DVC's experiment workspaces under `.dvc/tmp` (queued or running);
- every commit git can reach from a ref or a reflog (`git log --all --reflog --full-history`:
  branches, tags, stashes, DVC's experiment refs and queued experiments, both sides of merges),
  read from its `dvc.lock` and the manifest object in DVC's cache.

References match by prefix name (`part_N-<fingerprint>`: a hash of the part's input and download
settings), whatever URL spelling or mount led to them: a name referenced anywhere is kept.
`--delete` deletes nothing when a built commit's manifest is not in DVC's cache (`dvc gc` removed
it, or the commit was built elsewhere and never fetched: it may name any prefix), in a shallow
clone (history it cannot see), or while this project's DVC lock is held (a build running).
Prefixes without `_laionbuild_complete.json` (a download killed before its commit, which the next
build resumes, or one running) and `_scratch/` leftovers are kept unless `--incomplete`; one with a
live lease (laionbuild/shards/lease.py: a download writing it, in any clone) is kept even then.
Deleting removes the completion marker first and img2dataset's `*_stats.json` next (its resume
skips a shard whose stats exist), so a half-deleted prefix is downloaded again, never taken as
done; DVC run-cache entries whose manifest names a deleted prefix are dropped, so `dvc repro`
downloads it again instead of restoring a manifest of shards that are gone. Other clones sharing
the bucket are not visible from here (as with `dvc gc --cloud`): their uncommitted builds'
prefixes, and run-caches pulled elsewhere, count for nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from laionbuild.shards.lease import LEASE, live_holder
from laionbuild.shards.storage import COMPLETE, MANIFEST, filesystem, join

PREFIX = re.compile(r"^part_\d+-[0-9a-f]{16}(-retry-[0-9a-f]+)*$")  # (retry-failed copies: -retry-<uuid>)
SCRATCH = "_scratch"
NOT_IN_COMMIT = ("does not exist in", "exists on disk, but not in")  # git show: the commit has no dvc.lock


class GcError(RuntimeError):
    pass


@dataclass
class Prefix:
    name: str
    path: str  # within the filesystem
    complete: bool
    referenced_by: list[str] = field(default_factory=list)
    size: int = 0
    writing: str = ""  # the holder of a live lease (laionbuild/shards/lease.py): a download running


def _name(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


class _Cache:
    """Objects of this project's DVC cache (wherever cache.dir points): DVC 3's and the legacy
    (DVC 2) layout, and the run-cache."""

    def __init__(self, repo):
        self.files, self.legacy = repo.cache.local, repo.cache.legacy
        self.runs = Path(repo.stage_cache.cache_dir)

    def read(self, oid: str, legacy: bool) -> bytes:
        return Path((self.legacy if legacy else self.files).oid_to_path(oid)).read_bytes()

    def manifest_url(self, out: dict) -> str | None:
        """The prefix URL in a `data/images/part_N` output's manifest (None: shards in the
        workspace). FileNotFoundError when the objects are not in the cache."""
        oid = out.get("md5") or ""
        if not oid.endswith(".dir"):
            return None
        legacy = "hash" not in out  # DVC 2 lock entries: the legacy cache layout
        item = next((i for i in json.loads(self.read(oid, legacy)) if i.get("relpath") == MANIFEST), None)
        return None if item is None else json.loads(self.read(item["md5"], legacy))["url"]


def _download_outs(lock_or_entry: dict) -> list[dict]:
    return [o for o in lock_or_entry.get("outs") or [] if str(o.get("path", "")).startswith("data/images/")]


def manifests(root: Path, cache: _Cache, git: bool = True) -> tuple[dict[str, set[str]], list[str]]:
    """(prefix name -> where it is referenced, [why --delete must not run])."""
    refs: dict[str, set[str]] = defaultdict(set)
    for found in sorted(root.glob(f"data/images/part_*/{MANIFEST}")):
        refs[_name(json.loads(found.read_text())["url"])].add("workspace")
    for found in sorted((root / ".dvc" / "tmp").glob(f"**/data/images/part_*/{MANIFEST}")):
        refs[_name(json.loads(found.read_text())["url"])].add("experiment workspace")
    if not git:  # a DVC project without git (core.no_scm): the workspace is all there is
        return refs, []
    blockers = []
    if _git(root, "rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        blockers.append("this is a shallow git clone: commits it cannot see may name any prefix "
                        "(`git fetch --unshallow` first)")
    listed = _git(root, "log", "--all", "--reflog", "--full-history", "--format=%H", "--", "dvc.lock")
    if listed.returncode:
        raise GcError(f"gc-shards: `git log` failed, so the builds of past commits are unknown: {listed.stderr.strip()}")
    unreadable = []
    for commit in dict.fromkeys(listed.stdout.split()):
        lock = _git(root, "show", f"{commit}:./dvc.lock")  # (./: the project may sit below the git root)
        if lock.returncode:
            if any(s in lock.stderr for s in NOT_IN_COMMIT):
                continue
            raise GcError(f"gc-shards: cannot read dvc.lock of commit {commit[:10]}: {lock.stderr.strip()}")
        try:
            stages = (yaml.safe_load(lock.stdout) or {}).get("stages") or {}
        except yaml.YAMLError:
            unreadable.append(f"{commit[:10]} (dvc.lock does not parse)")
            continue
        for stage, entry in stages.items():
            for out in _download_outs(entry):
                try:
                    url = cache.manifest_url(out)
                except (FileNotFoundError, ValueError, KeyError):
                    unreadable.append(f"{commit[:10]} ({stage})")
                    continue
                if url:
                    refs[_name(url)].add(f"commit {commit[:10]}")
    if unreadable:
        blockers.append(f"the manifests of {len(unreadable)} built commits are not in the DVC cache, so the "
                        f"prefixes they name are unknown: {', '.join(unreadable[:5])}{' …' if len(unreadable) > 5 else ''}; "
                        "`dvc fetch --all-commits` (or `dvc exp pull`) them first")
    return refs, blockers


def scan(shards_url: str, refs: dict[str, set[str]]) -> list[Prefix]:
    """The prefixes under `shards_url` (and `_scratch/` leftovers) with what refers to them."""
    fs, base = filesystem(shards_url)
    fs.invalidate_cache()
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        entries = []

    def listed(name: str, path: str) -> Prefix | None:
        files = fs.find(path, detail=True)  # (an emptied "directory" of a versioned bucket: nothing)
        if not files:
            return None
        complete = any(f.rsplit("/", 1)[-1] == COMPLETE for f in files)
        prefix = Prefix(name, path, complete, size=sum(int(i.get("size") or 0) for i in files.values()))
        if not complete and any(LEASE.match(f.rsplit("/", 1)[-1]) for f in files):
            holder = live_holder(join(shards_url, name))
            prefix.writing = f"{holder.get('host')} pid {holder.get('pid')}" if holder else ""
        return prefix

    found = []
    for entry in sorted(entries, key=lambda e: e["name"]):
        name = _name(entry["name"])
        if entry["type"] != "directory":
            continue
        if name == SCRATCH:
            for sub in sorted(fs.ls(entry["name"], detail=False)):
                prefix = listed(f"{SCRATCH}/{_name(sub)}", sub)
                if prefix:
                    prefix.complete = False
                    found.append(prefix)
            continue
        if not PREFIX.match(name) or not (prefix := listed(name, entry["name"])):
            continue  # not ours, or gone
        prefix.referenced_by = sorted(refs.get(name, ()))
        found.append(prefix)
    return found


def _delete(fs, prefix: Prefix) -> None:
    root = prefix.path.rstrip("/")
    marker = f"{root}/{COMPLETE}"
    if fs.exists(marker):
        fs.rm(marker)  # first: a half-deleted prefix must not pass for a committed one
    stats = fs.glob(f"{root}/*_stats.json")
    if stats:
        fs.rm(stats)  # next: img2dataset's resume takes a shard with stats as done
    fs.rm(root, recursive=True)


def _forget_runs(cache: _Cache, names: set[str]) -> int:
    """Drop the DVC run-cache entries whose download output's manifest names a deleted prefix
    (`dvc repro` would restore that manifest instead of downloading again)."""
    dropped = 0
    for entry in sorted(cache.runs.glob("*/*/*")) if cache.runs.is_dir() else []:
        try:
            run = yaml.safe_load(entry.read_text()) or {}
            urls = [cache.manifest_url(out) for out in _download_outs(run)]
        except (OSError, ValueError, KeyError, yaml.YAMLError):
            continue
        if any(url and _name(url) in names for url in urls):
            entry.unlink()
            if not any(entry.parent.iterdir()):
                entry.parent.rmdir()  # (DVC takes an existing key's folder to hold an entry)
            dropped += 1
    return dropped


def _count(n: int) -> str:
    return f"{n} prefix" if n == 1 else f"{n} prefixes"


def _repo(root: Path):
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").exists():
        raise GcError(f"gc-shards: {root.resolve()} is not the DVC project (no .dvc/ or dvc.yaml): run it where "
                      "`laionbuild build` runs, so that its builds' manifests are found")
    from dvc.repo import Repo

    return Repo(str(root))


def collect(shards_url: str, delete: bool, incomplete: bool, root: Path = Path(".")) -> tuple[list[str], int]:
    """(report lines, exit status). Deletes only with `delete` and nothing blocking it."""
    from dvc.lock import LockError

    repo = _repo(root)
    try:
        with repo.lock if delete else nullcontext():
            return _collect(repo, shards_url, delete, incomplete, root)
    except LockError:
        raise GcError("gc-shards --delete: this project's DVC lock is held (a build running?); run it when no "
                      "build runs") from None
    finally:
        repo.close()


def _collect(repo, shards_url: str, delete: bool, incomplete: bool, root: Path) -> tuple[list[str], int]:
    cache = _Cache(repo)
    refs, blockers = manifests(root, cache, git=repo.scm.__class__.__name__ != "NoSCM")
    prefixes = scan(shards_url, refs)
    lines = [f"download.shards_url {shards_url}: {_count(len(prefixes))}"]
    doomed = []
    for p in prefixes:
        if p.referenced_by:
            more = len(p.referenced_by) - 3
            lines.append(f"  {p.name}  kept: {', '.join(p.referenced_by[:3])}{f', +{more}' if more > 0 else ''}")
        elif p.writing:
            lines.append(f"  {p.name}  kept: being written (lease of {p.writing}, a build running here or in "
                         f"another clone)  {p.size / 1e6:.1f} MB")
        elif not p.complete and not incomplete:
            lines.append(f"  {p.name}  kept: incomplete (a killed download the next build resumes, or one "
                         f"running; --incomplete deletes it)  {p.size / 1e6:.1f} MB")
        else:
            doomed.append(p)
            lines.append(f"  {p.name}  unreferenced{'' if p.complete else ', incomplete'}  {p.size / 1e6:.1f} MB")
    total = sum(p.size for p in doomed) / 1e6
    lines += blockers
    if blockers and delete:
        lines.append("nothing deleted")
        return lines, 1
    if not delete:
        lines.append(f"{_count(len(doomed))}, {total:.1f} MB to delete: run again with --delete")
        return lines, 0
    fs, _ = filesystem(shards_url)
    for p in doomed:
        _delete(fs, p)
    fs.invalidate_cache()
    lines.append(f"deleted {_count(len(doomed))}, {total:.1f} MB")
    forgotten = _forget_runs(cache, {p.name for p in doomed})
    if forgotten:
        lines.append(f"dropped {forgotten} DVC run-cache entries naming them (a rebuild downloads them again)")
    return lines, 0
