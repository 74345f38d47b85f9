"""The dataset project as a DVC repo: running DVC from this environment, its Hydra
integration, locks left by killed builds, workspace outputs of parts no longer in the recipe,
and each stage's state (built / stale / missing, and why)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from laionbuild.project.layout import INPUTS, PART_DIRS, PER_PART_STAGES, STAGES, part_of
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


def prune_stale_parts(parts: list[int]) -> list[Path]:
    """Remove workspace outputs of parts no longer in the recipe. They stay in DVC's cache (and
    come back from it when the part is added again); removing them keeps the global stages'
    directory dependencies equal to a build that never had the part, so DVC's run-cache can
    restore their outputs instead of recomputing."""
    removed = []
    for directory in PART_DIRS.values():
        if not directory.is_dir():
            continue
        for child in sorted(directory.iterdir()):
            part = part_of(child)
            if part is not None and part not in parts:
                shutil.rmtree(child)
                removed.append(child)
    return removed


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
    for name in names[1:]:
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
