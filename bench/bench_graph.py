"""What the stage graph's machinery costs at N parts (issue #21): the embeddings-only recipe
(laion2b_en_emb: no images, no model) on tiny stand-in parts (`--rows` rows each), so what is
timed is DVC and the stage processes, not the work. For each N, in a fresh `laionbuild init`
project:

  full build   `laionbuild build` of N parts, wall seconds (and per part)
  dvc cpu      the `dvc repro` process's own CPU (not its stage processes'), polled, as a share
               of the build's wall time: DVC's machinery (lock file rewrites, hashing)
  no-op        `dvc repro` with nothing to do; `laionbuild status`
  +1 part      the build with part N added (its per-part stages plus the global ones), as a
               fraction of the full build, and its seconds in the per-part stages (the rest is the
               global stages, whose work grows with all the parts: dedup, select, index, report)
  lock KB      dvc.lock's size

    .venv/bin/python bench/bench_graph.py [--parts 16,64,256,1024] [--rows 40] [--graph per-part,per-kind]

`--graph`: the per-part graph (a DVC stage per part and kind, the default) and the per-kind
graph (`laionbuild init --graph per-kind`: a stage per kind over every part), side by side.

Goals (#21, at 1,024 parts): no-op repro <= 10 s, status <= 10 s, <= 1 s a part, DVC's CPU
share <= 20 %. The fit in the issue (4.4 s + 0.125 s x parts, per part) puts 1,112 parts at
~140 s a part today; 1,024 parts take hours here, so run the small sizes first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BIN = Path(sys.executable).parent
DIM = 768


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.update(NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", PYSPARK_PYTHON=sys.executable, DVC_NO_ANALYTICS="1")
    return e


def write_part(root: Path, part: int, rows: int, rng) -> None:
    """metadata_NNNN.parquet + img_emb_NNNN.npy, LAION-2B-en's published layout."""
    (root / "laion2B-en-metadata").mkdir(parents=True, exist_ok=True)
    (root / "img_emb").mkdir(exist_ok=True)
    pq.write_table(pa.table({
        "url": [f"http://img{part}.example.com/{i}.jpg" for i in range(rows)],
        "caption": [f"part {part} row {i}" for i in range(rows)],
        "NSFW": ["UNLIKELY"] * rows, "similarity": rng.uniform(0.28, 0.4, rows), "LICENSE": ["?"] * rows,
        "width": np.full(rows, 256), "height": np.full(rows, 256),
    }), root / "laion2B-en-metadata" / f"metadata_{part:04d}.parquet")
    emb = rng.standard_normal((rows, DIM)).astype(np.float16)
    np.save(root / "img_emb" / f"img_emb_{part:04d}.npy", emb)


class DvcCpu:
    """Polls the `dvc repro` processes under this one and keeps each one's own CPU seconds
    (user + system, its children excluded) as last seen."""

    def __init__(self):
        import psutil

        self.psutil, self.seen, self.stop = psutil, {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        me = self.psutil.Process()
        while not self.stop.is_set():
            for child in me.children(recursive=True):
                try:
                    cmd = child.cmdline()
                    if "dvc" in cmd and "repro" in cmd:
                        t = child.cpu_times()
                        self.seen[child.pid] = t.user + t.system
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    pass
            time.sleep(0.2)

    def __enter__(self) -> "DvcCpu":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def seconds(self) -> float:
        return sum(self.seen.values())


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def timed_stages(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, of which in per-part stages): each DVC stage line starts the clock of
    that stage until the next one ("Running stage", "didn't change"); the per-part stages are
    fetch@N ... tag@N (per-part graph) or fetch ... tag (per-kind graph), the rest global."""
    import re

    kinds = ("fetch", "prepare", "download", "screen", "faces", "watermark", "embed", "tag")
    start = last = time.perf_counter()
    current, per_part = None, 0.0
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-60:]
        match = re.match(r"(?:Running stage|Stage) '([^']+)'", line)
        if match:
            now = time.perf_counter()
            if current and current.split("@")[0] in kinds:
                per_part += now - last
            current, last = match.group(1), now
    if proc.wait():
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{''.join(tail)}")
    end = time.perf_counter()
    if current and current.split("@")[0] in kinds:
        per_part += end - last
    return end - start, per_part


def recipe(source: Path, parts: int) -> list[str]:
    return ["recipe=laion2b_en_emb", f"source.base_url={source}", f"source.num_parts={parts + 1}",
            f"subset.parts=[{','.join(map(str, range(parts)))}]", "index.index_key=Flat"]


def measure(n: int, rows: int, work: Path, graph: str = "per-part") -> dict:
    rng = np.random.default_rng(n)
    source = work / "laion2B-en"
    for part in range(n + 1):
        write_part(source, part, rows, rng)
    project = work / "project"
    laionbuild = str(BIN / "laionbuild")
    timed([laionbuild, "init", "--graph", graph, str(project)], work)
    with DvcCpu() as dvc:
        full = timed([laionbuild, "build", *recipe(source, n)], project)
    noop = timed([sys.executable, "-m", "dvc", "repro"], project)
    status = timed([laionbuild, "status"], project)
    lock_kb = (project / "dvc.lock").stat().st_size / 1024
    plus_one, plus_one_parts = timed_stages([laionbuild, "build", *recipe(source, n + 1)], project)
    return {"parts": n, "full": full, "per_part": full / n, "dvc_share": dvc.seconds / full, "noop": noop,
            "status": status, "plus_one": plus_one, "plus_one_share": plus_one / full, "lock_kb": lock_kb,
            "plus_one_parts": plus_one_parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="16,64", help="comma-separated part counts (the issue's: 16,64,256,1024)")
    parser.add_argument("--rows", type=int, default=40, help="rows per stand-in part")
    parser.add_argument("--graph", default="per-part,per-kind",
                        help="the stage graphs to measure (`laionbuild init --graph`), side by side per size")
    args = parser.parse_args()
    print(f"{'graph':>9} {'parts':>6} {'full build':>11} {'per part':>9} {'dvc cpu':>8} {'no-op repro':>12} {'status':>7} "
          f"{'+1 part':>8} {'(of full)':>9} {'in part stages':>15} {'dvc.lock':>9}")
    for n, graph in ((int(p), g) for p in args.parts.split(",") for g in args.graph.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"bench_graph_{n}_") as tmp:
            r = measure(n, args.rows, Path(tmp), graph)
        print(f"{graph:>9} {r['parts']:>6} {r['full']:>10.1f}s {r['per_part']:>8.2f}s {r['dvc_share']:>7.0%} {r['noop']:>11.1f}s "
              f"{r['status']:>6.1f}s {r['plus_one']:>7.1f}s {r['plus_one_share']:>9.3f} {r['plus_one_parts']:>14.1f}s "
              f"{r['lock_kb']:>7.0f}KB",
              flush=True)


if __name__ == "__main__":
    main()
