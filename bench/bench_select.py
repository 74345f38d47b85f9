"""Selection benchmark (issue #5): one sweep point of `select` over N million synthetic tag rows
(default 10M, in parts of 1M), i.e. what a threshold change costs once the tags exist.

Prints the stage's wall time and CPU time (user+sys of the whole process, so "per core"), both
per 10M rows, with and without the interpreter start-up, and the goal (<= 1 s per 10M rows per
core).

    .venv/bin/python bench/bench_select.py [--millions 10] [--threshold 0.28] [--top-fraction 0.3]

`--top-fraction F` times DataComp's rule instead (select.top_fraction: {clip_similarity: F}, the
threshold over every part first, then the rows at or above it; issue #25).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--millions", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.28)
    parser.add_argument("--top-fraction", type=float, default=None)
    args = parser.parse_args()
    rule = (f"+select.top_fraction={{clip_similarity:{args.top_fraction}}}" if args.top_fraction is not None
            else f"select.min_clip_similarity={args.threshold}")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    parts = list(range(args.millions))
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        subprocess.run([str(BIN / "laionbuild"), "compose", "--conf-dir", str(ROOT / "conf"), "source.num_parts=1000",
                        "download=default",
                        f"subset.parts=[{','.join(map(str, parts))}]",
                        rule],
                       cwd=project, env=env, check=True, stdout=subprocess.DEVNULL)
        for p in parts:  # tag tables as the tag stage writes them: key, part, clip_similarity, width, height
            target = project / f"data/tags/part_{p}"
            target.mkdir(parents=True)
            duckdb.sql(f"""COPY (SELECT printf('%05d%09d', {p}, i) AS key, {p}::INTEGER AS part,
                                  (0.15 + 0.2 * ((i * 7919 + {p}) % 1000) / 1000.0)::FLOAT AS clip_similarity,
                                  (64 + i % 1000)::BIGINT AS width, (64 + i % 700)::BIGINT AS height
                           FROM range(1000000) t(i)) TO '{target}/tags.parquet' (FORMAT parquet)""")
        idle_wall, idle_cpu = run([sys.executable, "-c", "import laionbuild.stages.selection"], project, env)
        wall, cpu = run([str(BIN / "laionbuild"), "stage", "select"], project, env)
        kept = duckdb.sql(f"SELECT count(*) FROM '{project}/data/selected/selected.parquet'").fetchone()[0]
    scale = 10 / args.millions
    print(f"select over {args.millions}M tag rows ({rule}): {kept} kept")
    print(f"  whole stage:          wall {wall * scale:6.2f} s   cpu {cpu * scale:6.2f} s   per 10M rows")
    print(f"  minus start-up ({idle_wall:.2f} s wall): wall {(wall - idle_wall) * scale:6.2f} s   "
          f"cpu {(cpu - idle_cpu) * scale:6.2f} s   per 10M rows   (goal: cpu <= 1 s per 10M rows)")


if __name__ == "__main__":
    main()
