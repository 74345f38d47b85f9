"""Sweep benchmark (issue #6): a K-point threshold sweep (`laionbuild build -m
select.min_clip_similarity=a,b,...`, one DVC experiment per point) vs one build of the same
recipe, each in a fresh `laionbuild init` repo, measured side by side in one run. The goal is
K=5 <= 1.3x one build on the demo: expensive stages (download, embed) run once, every point
after the first reruns select and what follows.

    .venv/bin/python bench/bench_sweep.py [--points 5] [--tiny] [--parts 0,1,2]

`--tiny` embeds with the tiny test model (seconds) instead of the demo's ViT-B-32, which makes
the build cheaper and so the ratio harsher.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.update(NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", PYSPARK_PYTHON=sys.executable, DVC_NO_ANALYTICS="1",
             GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="b@b")
    return e


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}")
    return time.perf_counter() - start, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=5)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--parts", default="0,1,2")
    args = parser.parse_args()
    overrides = [f"subset.parts=[{args.parts}]", "download.processes_count=1"]
    if args.tiny:
        overrides += ["embed.model=laionbuild-tiny", "embed.batch_size=16"]
    # the untrained demo model's similarities sit in a narrow band around 0: keep every point non-empty
    thresholds = [round(-0.1 + 0.01 * i, 2) for i in range(args.points)]
    laionbuild = str(BIN / "laionbuild")
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        tmp = Path(tmp)
        for name in ("one", "sweep"):
            timed([laionbuild, "init", str(tmp / name)], tmp)
        one, _ = timed([laionbuild, "build", *overrides, f"select.min_clip_similarity={thresholds[0]}"], tmp / "one")
        sweep, out = timed([laionbuild, "build", "-m", *overrides,
                            "select.min_clip_similarity=" + ",".join(map(str, thresholds))], tmp / "sweep")
    ran = re.findall(r"Running stage '([^']+)'", out)
    print(f"demo recipe, parts [{args.parts}], model {'laionbuild-tiny' if args.tiny else 'ViT-B-32 (random)'}")
    print(f"{'one build':<28}{one:8.1f} s")
    print(f"{f'sweep of {args.points} points':<28}{sweep:8.1f} s   ({args.points} DVC experiments)")
    print(f"{'ratio sweep / one build':<28}{sweep / one:8.2f}     goal <= 1.3 for 5 points")
    print(f"{'per extra point':<28}{(sweep - one) / max(args.points - 1, 1):8.1f} s")
    print(f"stages run by the sweep: download x{sum(s.startswith('download') for s in ran)}, "
          f"embed x{sum(s.startswith('embed') for s in ran)}, select x{ran.count('select')}, "
          f"index x{ran.count('index')}")


if __name__ == "__main__":
    main()
