"""The dataset project as a DVC repo: running DVC from this environment, its Hydra
integration, locks left by killed builds, workspace outputs of parts no longer in the recipe
(removed when DVC's cache holds them, kept aside otherwise), and each stage's state (built /
stale / missing, and why)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from laionbuild.project.layout import DATA, INPUTS, PART_DIRS, PER_PART_STAGES, STAGES, part_of
from laionbuild.recipe.schema import load_params

log = logging.getLogger("laionbuild")


def dvc_env() -> dict:
    """This environment's bin first on PATH, so the stage commands in dvc.yaml
    (`laionbuild stage ...`) resolve to this installation."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def run_dvc(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """Run DVC from this environment."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], env=dvc_env(), text=True,
                          capture_output=capture, check=False)


def clear_dead_dvc_locks(dvc_dir: Path = Path(".dvc")) -> list[int]:
    """Drop entries of dead processes from DVC's rwlock, so a build killed with SIGKILL can be
    rerun. DVC does this itself, except for zombies: a killed `dvc repro` whose parent died too
    stays a zombie where PID 1 does not reap (containers), and DVC takes it for alive."""
    import psutil
    from dvc.fs import localfs
    from dvc.rwlock import _edit_rwlock

    tmp_dir = dvc_dir / "tmp"
    if not (tmp_dir / "rwlock").exists():
        return []

    def dead(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    cleared: set[int] = set()
    with _edit_rwlock(str(tmp_dir), localfs, False) as lock:
        for path, info in list(lock["write"].items()):
            if dead(info["pid"]):
                cleared.add(info["pid"])
                del lock["write"][path]
        for path, infos in list(lock["read"].items()):
            alive = [i for i in infos if not dead(i["pid"])]
            cleared.update(i["pid"] for i in infos if i not in alive)
            if alive:
                lock["read"][path] = alive
            else:
                del lock["read"][path]
    if cleared:
        log.warning("cleared DVC locks of killed processes %s", sorted(cleared))
    return sorted(cleared)


KEPT = DATA / ".kept"  # outputs of dropped parts that DVC's cache does not hold (ignored by git and DVC)


def prune_stale_parts(parts: list[int]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """Take workspace outputs of parts no longer in the recipe out of the stage directories, so the
    global stages' directory dependencies equal a build that never had the part and DVC's
    run-cache can restore their outputs instead of recomputing. An output DVC's cache holds as it
    is (dvc.lock's hash, its `.dir` listing and every file's object in the cache) is removed: it
    comes back from the cache when the part is added again. Any other (built but never committed:
    a build killed while DVC saved it, a stage run by hand, a file changed since) is moved to
    `data/.kept/<dir>/part_N`, never deleted. Returns (removed, [(kept, where it went)])."""
    stale = [child for directory in PART_DIRS.values() if directory.is_dir()
             for child in sorted(directory.iterdir())
             if (part := part_of(child)) is not None and part not in parts]
    if not stale:
        return [], []
    held = cache_holds(stale)
    removed, kept = [], []
    for path in stale:
        if held[path]:
            shutil.rmtree(path)
            removed.append(path)
            continue
        target = KEPT / path.relative_to(DATA)
        for n in range(1, 1000):
            if not target.exists():
                break
            target = KEPT / path.relative_to(DATA).with_name(f"{path.name}.{n}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        kept.append((path, target))
    return removed, kept


def cache_holds(paths: list[Path]) -> dict[Path, bool]:
    """Whether DVC's cache holds each workspace directory exactly as it is, without hashing it:
    the output of dvc.lock that records it (the directory itself, or a global output above it)
    has its `.dir` listing in the cache, the directory holds the listed files and no others, and
    each file is the cached object itself (a DVC link) or has, in DVC's state db (inode, mtime,
    size -> md5, written when DVC hashed it), the listed hash, whose object is in the cache. A file
    DVC never hashed as it is now counts as not held: deciding costs one stat and one state
    lookup per file, never a read of the shards."""
    import yaml

    result = dict.fromkeys(paths, False)
    if not Path("dvc.lock").exists():
        return result
    stages = (yaml.safe_load(Path("dvc.lock").read_text()) or {}).get("stages") or {}
    outs = {Path(o["path"]): o for entry in stages.values() for o in entry.get("outs") or []
            if str(o.get("md5", "")).endswith(".dir")}
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(".")
    except NotDvcRepoError:  # (a dvc.lock without .dvc/: no cache to hold anything)
        return result
    with repo:
        listings: dict[Path, list] = {}
        for path in paths:
            out_path = next((p for p in (path, *path.parents) if p in outs), None)
            if out_path is None:
                continue
            out = outs[out_path]
            odb = repo.cache.local if "hash" in out else repo.cache.legacy  # (DVC 2 lock entries: legacy layout)
            if out_path not in listings:
                try:
                    listings[out_path] = json.loads(Path(odb.oid_to_path(out["md5"])).read_text())
                except (OSError, ValueError):
                    listings[out_path] = []
            below = path.relative_to(out_path).as_posix()
            start = "" if below == "." else below + "/"
            recorded = {e["relpath"][len(start):]: e["md5"] for e in listings[out_path]
                        if e.get("relpath", "").startswith(start)}
            if recorded:
                result[path] = _files_held(repo, odb, path, recorded)
    return result


def _files_held(repo, odb, path: Path, recorded: dict[str, str]) -> bool:
    found = {f.relative_to(path).as_posix(): f for f in path.rglob("*") if f.is_file() or f.is_symlink()}
    if set(found) != set(recorded):
        return False
    for name, file in found.items():
        cached = odb.oid_to_path(recorded[name])
        if not os.path.exists(cached):
            return False
        if os.path.samefile(file, cached):  # hardlink/symlink/reflink-less link types: the object itself
            continue
        _, hash_info = repo.state.get(os.path.abspath(file), repo.fs)
        if hash_info is None or hash_info.value != recorded[name]:
            return False
    return True


def enable_dvc_hydra() -> None:
    """`dvc exp run -S` composes conf/config.yaml into params.yaml (DVC's Hydra integration)."""
    result = run_dvc("config", "hydra.enabled", capture=True)
    if result.stdout.strip() != "true":
        for key, value in (("hydra.enabled", "true"), ("hydra.config_dir", "conf"), ("hydra.config_name", "config")):
            if run_dvc("config", key, value).returncode:
                raise RuntimeError(f"dvc config {key} {value} failed")


def stage_status() -> list[tuple[str, str, str]]:
    """(stage name as DVC knows it, built|stale|missing, why) for every stage of params.yaml's
    recipe. Why a stage is stale: `file: PATH` (a file it reads changed: seen by the last build's
    `inputs` check, or by the same check run here, which writes nothing), `params: KEY` (a
    recipe key it tracks), `deps: PATH` (an output of the stage before it). `inputs` itself
    runs on every build and is listed with what it checks."""
    import yaml

    from laionbuild.project.inputs import expected, pending
    from laionbuild.project.partwise import is_per_kind

    cfg = load_params("params.yaml")
    lock = {}
    if Path("dvc.lock").exists():
        lock = (yaml.safe_load(Path("dvc.lock").read_text()) or {}).get("stages", {})
    result = run_dvc("status", "--json", capture=True)
    if result.returncode != 0:
        raise RuntimeError(f"dvc status failed: {result.stderr.strip()}")
    changed = json.loads(result.stdout or "{}")
    try:
        checked = expected(cfg)
        files = pending(cfg, checked)
        inputs = ("inputs", "checked", f"on every build: {sum(len(c['inputs']) for c in checked.values())} files")
    except OSError as exc:  # a store unreachable: the rest of the status still holds
        files, inputs = {}, ("inputs", "not checked", str(exc))
    names = [f"{s}@{p}" if s in PER_PART_STAGES else s for s in STAGES
             for p in (cfg.subset.parts if s in PER_PART_STAGES else [None])]
    rows = [inputs]
    params = yaml.safe_load(Path("params.yaml").read_text()) or {}
    per_kind = is_per_kind()
    fingerprints: dict = {}  # per kind (its params read once), for the per-kind graph's part rows
    for name in names[1:]:
        if per_kind and "@" in name:
            rows.append(_part_status(name, lock, changed, files, fingerprints))
            continue
        deleted, why = _why_stale(changed.get(name, []))
        # a tracked section (`select`) names the keys of it that changed (`select.min_clip_similarity`)
        was = lock.get(name, {}).get("params", {}).get("params.yaml", {})
        why["params"] = [k for key in why["params"] for k in (_changed_keys(key, was.get(key), _at(params, key))
                                                               or [key])]
        why["file"] = list(dict.fromkeys(files.get(name, []) + why["file"]))
        reason = "; ".join(f"{kind}: {_few(items)}" for kind, items in why.items() if items)
        if name not in lock:
            rows.append((name, "missing", ""))
        elif deleted:
            rows.append((name, "missing", reason))
        elif reason:
            rows.append((name, "stale", reason))
        else:
            rows.append((name, "built", ""))
    return rows


def _part_status(name: str, lock: dict, changed: dict, files: dict, fingerprints: dict) -> tuple[str, str, str]:
    """A part's row in the per-kind graph (project/partwise.py): its kind's stage as DVC
    sees it, then the part's marker against its fingerprint now (the params that differ, by
    key; the inputs of that part that differ), and the files the inputs check sees changed."""
    from laionbuild.project.partwise import Fingerprints, marker_of

    kind, _, part = name.partition("@")
    part = int(part)
    marker = marker_of(kind, part)
    deleted, _ = _why_stale(changed.get(kind, []))
    if kind not in lock or marker is None or deleted:
        return name, "missing", ""
    if kind not in fingerprints:
        fingerprints[kind] = Fingerprints(kind)
    now = fingerprints[kind].record(part)
    was = marker.get("params", {})
    why = {"file": files.get(name, []),
           "params": [k for key, value in now["params"].items() if was.get(key) != value
                      for k in (_changed_keys(key, was.get(key), value) or [key])],
           "deps": [p for p, digest in now["deps"].items() if marker.get("deps", {}).get(p) != digest]}
    reason = "; ".join(f"{kind}: {_few(items)}" for kind, items in why.items() if items)
    if not reason and marker.get("fingerprint") != now["fingerprint"]:
        reason = "cmd"
    return name, "stale" if reason else "built", reason


def _why_stale(entries: list) -> tuple[bool, dict[str, list[str]]]:
    """(an output deleted?, {file|params|deps|outs: what changed}) from a stage's `dvc status
    --json` entries; a changed fingerprint file (data/inputs/) is named by the files it records."""
    from laionbuild.project.inputs import recorded

    deleted, why = False, {"file": [], "params": [], "deps": [], "outs": []}
    for entry in entries:
        if not isinstance(entry, dict):
            continue  # "always changed"
        for kind, items in entry.items():
            if not isinstance(items, dict):
                continue
            for path, state in items.items():
                if isinstance(state, dict):  # a params file: key -> modified/new/deleted
                    why["params"] += list(state)
                    continue
                deleted = deleted or state == "deleted"
                if path.startswith(f"{INPUTS.as_posix()}/"):
                    content = recorded(path.removeprefix(f"{INPUTS.as_posix()}/")) or {}
                    why["file"] += list(content.get("inputs", {})) or [path]
                else:
                    why["outs" if kind == "changed outs" else "deps"].append(path)
    return deleted, why


def _few(items: list[str], shown: int = 3) -> str:
    """`a, b, c` or `a, b, c and 106 more` (a folder's many images on one status line)."""
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {more} more" if more > 0 else "")


def _at(raw: dict, key: str):
    for name in key.split("."):
        raw = raw.get(name) if isinstance(raw, dict) else None
    return raw


def _changed_keys(key: str, old, new) -> list[str]:
    """The dotted keys under `key` whose values differ between two values of a section."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for name in sorted(set(old) | set(new))
                for k in _changed_keys(f"{key}.{name}", old.get(name), new.get(name))]
    return [] if old == new else [key]


def check_output_layouts(dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Refuse a dvc.yaml whose stages ask for another output layout than this laionbuild writes
    (`--layout N` in their cmd; project/layout.py OUTPUT_LAYOUTS): a dataset repo keeps its own
    dvc.yaml across upgrades, and DVC would never run an up-to-date stage, so its outputs of the
    old layout (data/embeddings named so that autofaiss numbers rows otherwise) would stay."""
    import re

    import yaml

    from laionbuild.project.layout import OUTPUT_LAYOUTS, output_layout_error
    from laionbuild.recipe.errors import LaionbuildError

    if not dvc_yaml.exists():
        return
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    for name in OUTPUT_LAYOUTS:
        if name not in stages:
            continue
        cmd = stages[name].get("cmd", "") if isinstance(stages[name], dict) else ""
        found = re.search(r"--layout[ =](\d+)", " ".join(cmd) if isinstance(cmd, list) else str(cmd))
        if wrong := output_layout_error(name, int(found.group(1)) if found else None):
            raise LaionbuildError(f"{dvc_yaml.resolve()}: {wrong}")
