"""What DVC itself costs per stage, for the stage-graph layouts #21 weighs (no laionbuild code).

Every stage is a trivial shell command (mkdir + echo), so what is timed is DVC's machinery: reading
the graph, hashing deps, running, writing dvc.lock. The graph has laionbuild's shape: per part
fetch -> prepare, a global dedup over data/prepared writing one data/deduped/part_N per part,
per part download -> faces, embed -> tag, and a global select over data/tags.

Layouts:
  one      one dvc.yaml, foreach over the parts (today's layout): one dvc.lock for every stage
  split    the per-part stages in graph/gNNN/dvc.yaml (G parts each, wdir ../..), each with its
           own dvc.lock; the global stages in the root dvc.yaml
  grouped  one stage per kind per group of G parts, listing the group's per-part deps and outs
           (a stage runs all its parts in one process)

Usage: python bench/bench_dvc_layouts.py [--parts 16,64] [--group 32] [--layouts one,split,grouped]
Prints per layout and size: full repro, seconds per part, no-op repro, `dvc status`, +1 part, lock KB.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PER_PART_BEFORE = [("fetch", None, "raw"), ("prepare", "raw", "prepared")]
PER_PART_AFTER = [("download", "deduped", "images"), ("faces", "images", "faces"),
                  ("embed", "images", "embed"), ("tag", "embed", "tags")]


def _dvc():
    return str(Path(sys.executable).with_name("dvc"))


def _touch(out: str, extra: str = "") -> str:
    return f"mkdir -p {out} && echo {extra or out} > {out}/x"


def _stage_part(kind: str, dep: str | None, out: str, p: int, also: str = "") -> dict:
    deps = [f"data/{dep}/part_{p}"] if dep else []
    if kind == "tag":
        deps.append(f"data/faces/part_{p}")
    if kind == "fetch":
        deps.append(f"src/part_{p}.txt")
    return {"cmd": _touch(f"data/{out}/part_{p}"), "deps": deps, "outs": [f"data/{out}/part_{p}"]}


def _global_stages(parts: list[int]) -> dict:
    dedup_cmd = " && ".join(_touch(f"data/deduped/part_{p}") for p in parts)
    return {
        "dedup": {"cmd": dedup_cmd, "deps": ["data/prepared"], "outs": ["data/deduped"]},
        "select": {"cmd": _touch("data/selected"), "deps": ["data/tags"], "outs": ["data/selected"]},
    }


def _yaml(obj) -> str:
    import yaml
    return yaml.safe_dump(obj, sort_keys=False, width=1000)


def write_graph(root: Path, parts: list[int], layout: str, group: int) -> None:
    for f in root.glob("graph/*/dvc.yaml"):
        f.unlink()
    stages = {}
    kinds = PER_PART_BEFORE + PER_PART_AFTER
    if layout == "one":
        for kind, dep, out in kinds:
            for p in parts:
                stages[f"{kind}_{p}"] = _stage_part(kind, dep, out, p)
    elif layout == "split":
        groups: dict[int, dict] = {}
        for kind, dep, out in kinds:
            for p in parts:
                st = _stage_part(kind, dep, out, p)
                st["wdir"] = "../.."
                groups.setdefault(p // group, {})[f"{kind}_{p}"] = st
        for g, gst in groups.items():
            d = root / "graph" / f"g{g:04d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "dvc.yaml").write_text(_yaml({"stages": gst}))
    elif layout == "grouped":
        by_group: dict[int, list[int]] = {}
        for p in parts:
            by_group.setdefault(p // group, []).append(p)
        for kind, dep, out in kinds:
            for g, ps in by_group.items():
                subs = [_stage_part(kind, dep, out, p) for p in ps]
                stages[f"{kind}_g{g}"] = {
                    "cmd": " && ".join(s["cmd"] for s in subs),
                    "deps": [d for s in subs for d in s["deps"]],
                    "outs": [o for s in subs for o in s["outs"]],
                }
    stages.update(_global_stages(parts))
    (root / "dvc.yaml").write_text(_yaml({"stages": stages}))
    for p in parts:
        (root / "src").mkdir(exist_ok=True)
        src = root / "src" / f"part_{p}.txt"
        if not src.exists():
            src.write_text(f"part {p}\n")


def _timed(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t


def _cpu_children() -> float:
    ru = os.times()
    return ru.children_user + ru.children_system


def measure(n: int, layout: str, group: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"dvcbench-{layout}-{n}-"))
    try:
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        subprocess.run([_dvc(), "init", "-q"], cwd=root, check=True)
        parts = list(range(n))
        write_graph(root, parts, layout, group)
        full = _timed([_dvc(), "repro", "--quiet"], root)
        noop = _timed([_dvc(), "repro", "--quiet"], root)
        status = _timed([_dvc(), "status", "--quiet"], root)
        write_graph(root, parts + [n], layout, group)
        plus1 = _timed([_dvc(), "repro", "--quiet"], root)
        locks = sum(f.stat().st_size for f in root.rglob("dvc.lock"))
        return {"full": full, "per_part": full / n, "noop": noop, "status": status, "plus1": plus1,
                "lock_kb": locks / 1024}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="16,64")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--layouts", default="one,split,grouped")
    args = ap.parse_args()
    print(f"{'layout':8} {'parts':>5} {'full s':>8} {'s/part':>7} {'no-op s':>8} {'status s':>8} "
          f"{'+1 part s':>9} {'lock KB':>8}", flush=True)
    for n in [int(x) for x in args.parts.split(",")]:
        for layout in args.layouts.split(","):
            r = measure(n, layout, args.group)
            print(f"{layout:8} {n:5d} {r['full']:8.1f} {r['per_part']:7.2f} {r['noop']:8.1f} "
                  f"{r['status']:8.1f} {r['plus1']:9.1f} {r['lock_kb']:8.0f}", flush=True)


if __name__ == "__main__":
    main()
