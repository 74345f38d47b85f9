"""`laionbuild gc-shards`: the prefixes under `download.shards_url` that no build refers to.

Every distinct input of a part's download gets its own prefix (`part_N-<fingerprint>`, see
laionbuild/storage.py), so a sweep over download settings leaves one copy of the images per
point. DVC's `dvc gc` cleans its cache, which holds the manifests but not these tars: this is
their gc. A prefix is referenced by the manifest (`data/images/part_N/shards.json`) of

- the workspace, and of DVC's experiment workspaces under `.dvc/tmp` (queued or running);
- every commit reachable from a git ref (`git log --all`: branches, tags and DVC's
  experiment refs), read from its `dvc.lock` and the manifest object in DVC's cache.

A commit whose manifest is not in the cache (`dvc gc` removed it, or it was built elsewhere and
never fetched) may name any prefix: `--delete` then deletes nothing and says which commits to
`dvc fetch`. Prefixes without `_laionbuild_complete.json` (a download killed before its commit,
which the next build resumes, or one running now) and `_scratch/` leftovers are kept unless
`--incomplete`. Deleting removes the completion marker first, so a half-deleted prefix never
passes for a committed one: a later build with the same input downloads it again. Other clones
sharing the bucket are not visible from here (as with `dvc gc --cloud`): their uncommitted
builds' prefixes count as unreferenced.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .storage import COMPLETE, MANIFEST, filesystem, join

PREFIX = re.compile(r"^part_\d+-[0-9a-f]{16}$")
SCRATCH = "_scratch"


@dataclass
class Prefix:
    name: str
    path: str  # within the filesystem
    complete: bool
    referenced_by: list[str] = field(default_factory=list)
    size: int = 0


def _same_location(a: str, b: str) -> bool:
    (fa, pa), (fb, pb) = filesystem(a), filesystem(b)
    return type(fa) is type(fb) and pa.rstrip("/") == pb.rstrip("/")


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _cache_path(root: Path):
    """oid -> path of the object in this repo's DVC cache (wherever cache.dir points)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        cache = repo.cache.local
        return cache.oid_to_path


def manifests(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """(prefix URL -> where it is referenced, [commits whose manifests cannot be read])."""
    refs: dict[str, set[str]] = defaultdict(set)
    for found in sorted(root.glob(f"data/images/part_*/{MANIFEST}")):
        refs[json.loads(found.read_text())["url"]].add("workspace")
    for found in sorted((root / ".dvc" / "tmp").glob(f"**/data/images/part_*/{MANIFEST}")):
        refs[json.loads(found.read_text())["url"]].add("experiment workspace")
    unreadable = []
    listed = _git(root, "log", "--all", "--format=%H", "--", "dvc.lock")
    if listed.returncode:  # not a git repo, or no commit yet
        return refs, unreadable
    oid_path = _cache_path(root) if listed.stdout.strip() else None
    for commit in listed.stdout.split():
        lock = _git(root, "show", f"{commit}:dvc.lock")
        if lock.returncode:
            continue  # the commit deleted dvc.lock
        stages = (yaml.safe_load(lock.stdout) or {}).get("stages") or {}
        for stage, entry in stages.items():
            if not stage.startswith("download@"):
                continue
            for out in entry.get("outs") or []:
                oid = out.get("md5") or ""
                if not oid.endswith(".dir"):
                    continue
                try:
                    listing = json.loads(Path(oid_path(oid)).read_text())
                    item = next((i for i in listing if i.get("relpath") == MANIFEST), None)
                    if item is None:
                        continue  # shards in the workspace (no download.shards_url): nothing outside
                    url = json.loads(Path(oid_path(item["md5"])).read_text())["url"]
                except FileNotFoundError:
                    unreadable.append(f"{commit[:10]} ({stage})")
                    continue
                refs[url].add(f"commit {commit[:10]}")
    return refs, unreadable


def scan(shards_url: str, root: Path = Path(".")) -> tuple[list[Prefix], list[str]]:
    """The prefixes under `shards_url` (and `_scratch/` leftovers) with what refers to them."""
    fs, base = filesystem(shards_url)
    fs.invalidate_cache(base)
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        entries = []
    refs, unreadable = manifests(root)
    found = []

    def listed(name: str, path: str) -> Prefix | None:
        files = fs.find(path, detail=True)  # (an emptied "directory" of a versioned bucket: nothing)
        if not files:
            return None
        complete = any(f.rsplit("/", 1)[-1] == COMPLETE for f in files)
        return Prefix(name, path, complete, size=sum(int(i.get("size") or 0) for i in files.values()))

    for entry in sorted(entries, key=lambda e: e["name"]):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] != "directory":
            continue
        if name == SCRATCH:
            for sub in sorted(fs.ls(entry["name"], detail=False)):
                prefix = listed(f"{SCRATCH}/{sub.rstrip('/').rsplit('/', 1)[-1]}", sub)
                if prefix:
                    prefix.complete = False
                    found.append(prefix)
            continue
        if not PREFIX.match(name) or not (prefix := listed(name, entry["name"])):
            continue  # not ours, or gone
        url = join(shards_url, name)
        prefix.referenced_by = sorted(w for ref_url, where in refs.items() if _same_location(ref_url, url)
                                      for w in where)
        found.append(prefix)
    return found, unreadable


def _count(n: int) -> str:
    return f"{n} prefix" if n == 1 else f"{n} prefixes"


def collect(shards_url: str, delete: bool, incomplete: bool, root: Path = Path(".")) -> tuple[list[str], int]:
    """(report lines, exit status). Deletes only with `delete` and every manifest readable."""
    prefixes, unreadable = scan(shards_url, root)
    lines = [f"download.shards_url {shards_url}: {_count(len(prefixes))}"]
    doomed = []
    for p in prefixes:
        if p.referenced_by:
            where = ", ".join(p.referenced_by[:3]) + (f", +{len(p.referenced_by) - 3}" if len(p.referenced_by) > 3 else "")
            lines.append(f"  {p.name}  kept: {where}")
        elif not p.complete and not incomplete:
            lines.append(f"  {p.name}  kept: incomplete (a killed download the next build resumes, or one "
                         f"running; --incomplete deletes it)  {p.size / 1e6:.1f} MB")
        else:
            doomed.append(p)
            lines.append(f"  {p.name}  unreferenced{'' if p.complete else ', incomplete'}  {p.size / 1e6:.1f} MB")
    total = sum(p.size for p in doomed) / 1e6
    if unreadable:
        lines.append(f"the manifests of {len(unreadable)} built commits are not in the DVC cache, so the prefixes "
                     f"they name are unknown: {', '.join(unreadable[:5])}{' …' if len(unreadable) > 5 else ''}; "
                     "`dvc fetch --all-commits` (or `dvc exp pull`) them first")
        if delete:
            lines.append("nothing deleted")
            return lines, 1
    if not delete:
        lines.append(f"{_count(len(doomed))}, {total:.1f} MB to delete: run again with --delete")
        return lines, 0
    fs, _ = filesystem(shards_url)
    for p in doomed:
        marker = f"{p.path.rstrip('/')}/{COMPLETE}"
        if fs.exists(marker):
            fs.rm(marker)  # first: a half-deleted prefix must not pass for a committed one
        fs.rm(p.path, recursive=True)
    fs.invalidate_cache()
    lines.append(f"deleted {_count(len(doomed))}, {total:.1f} MB")
    return lines, 0
