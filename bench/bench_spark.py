"""Spark overhead benchmark (issue #7): the demo recipe built stage by stage with `engine=local`
and with `engine=spark` (`engine.master=local[2]`), in two fresh project copies, one after the
other in one run, each stage timed as DVC runs it (`laionbuild stage NAME [--part N]`, one
process each, so a Spark stage pays its session start-up every time). Prints seconds per stage
(parts added up) and the ratio spark / local, so users can see what Spark costs on one machine
and which stages it touches.

    .venv/bin/python bench/bench_spark.py [--fast] [--parts 0,1,2]

Stages that run on Spark with engine=spark: prepare, dedup (Spark SQL), download (img2dataset's
pyspark distributor), embed (clip-retrieval's pyspark distributor), index (autofaiss's
distributed="pyspark"). The others are the same code on both engines (their ratio shows the
noise). Spark pays off when the work per stage outgrows one machine; on one 2-core box it only
adds start-up and serialisation.
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

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FILES = ["conf", "dvc.yaml", "demo", ".dvcignore", ".gitignore"]
PER_PART = ["fetch", "prepare", None, "download", "faces", "watermark", "embed", "tag"]  # None: dedup (global) goes here
GLOBAL_AFTER = ["neardup", "select", "assemble", "export", "index", "report"]
ON_SPARK = {"prepare", "dedup", "download", "embed", "index"}


def run(cmd: list[str], cwd: Path) -> float:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", NO_ALBUMENTATIONS_UPDATE="1",
               HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", PYSPARK_PYTHON=sys.executable)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}")
    return elapsed


def build(project: Path, overrides: list[str], parts: list[int]) -> dict[str, float]:
    """Seconds per stage (per-part stages added up), stages in dvc.yaml's order."""
    laionbuild = str(BIN / "laionbuild")
    run([laionbuild, "compose", *overrides], project)
    times: dict[str, float] = {}
    for stage in PER_PART:
        if stage is None:
            times["dedup"] = run([laionbuild, "stage", "dedup"], project)
            continue
        times[stage] = sum(run([laionbuild, "stage", stage, "--part", str(p)], project) for p in parts)
    for stage in GLOBAL_AFTER:
        times[stage] = run([laionbuild, "stage", stage], project)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true", help="tiny model (laionbuild-tiny), as the tests use")
    parser.add_argument("--parts", default="0,1,2")
    args = parser.parse_args()
    parts = [int(p) for p in args.parts.split(",")]
    common = [f"subset.parts=[{args.parts}]"] + (["embed.model=laionbuild-tiny"] if args.fast else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine, extra in (("local", ["engine=local"]), ("spark", ["engine=spark", "engine.master='local[2]'"])):
            project = Path(tmp) / engine
            project.mkdir()
            for name in FILES:
                (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, project / name)
            results[engine] = build(project, common + extra, parts)
    local, spark = results["local"], results["spark"]
    print(f"demo recipe, parts {args.parts}{' (--fast)' if args.fast else ''}, {os.cpu_count()} cores, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'stage':<12}{'local s':>9}{'spark s':>9}{'spark/local':>13}   on Spark?")
    for stage in local:
        print(f"{stage:<12}{local[stage]:>9.1f}{spark[stage]:>9.1f}{spark[stage] / local[stage]:>13.2f}   "
              f"{'yes' if stage in ON_SPARK else 'no (same code)'}")
    total_l, total_s = sum(local.values()), sum(spark.values())
    print(f"{'total':<12}{total_l:>9.1f}{total_s:>9.1f}{total_s / total_l:>13.2f}")


if __name__ == "__main__":
    main()
