"""Spine benchmark on the demo recipe, in a fresh project copy: full build, no-op `dvc repro`,
and a threshold change (select and what follows), printed side by side as ratios to the full
build. Incremental rebuilds should cost a small fraction of a full one.

    .venv/bin/python bench/bench_spine.py            # the demo as shipped (untrained ViT-B-32)
    .venv/bin/python bench/bench_spine.py --fast     # tiny model, as the tests use
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FILES = ["conf", "dvc.yaml", "demo", ".dvcignore", ".gitignore"]


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", NO_ALBUMENTATIONS_UPDATE="1",
               HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}")
    return elapsed, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true", help="tiny model (laionbuild-tiny)")
    args = parser.parse_args()
    extra = ["embed.model=laionbuild-tiny"] if args.fast else []
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        for name in FILES:
            (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, project / name)
        for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
            run(cmd, project)
        laionbuild = str(BIN / "laionbuild")
        full, _ = run([laionbuild, "build", *extra], project)
        noop, out = run([sys.executable, "-m", "dvc", "repro"], project)
        ran = [s for s in re.findall(r"Running stage '([^']+)'", out) if s != "inputs"]  # (the check runs always)
        assert not ran, f"no-op repro ran {ran}"
        threshold, out = run([laionbuild, "build", *extra, "select.min_clip_similarity=-0.02"], project)
        rerun = [s for s in re.findall(r"Running stage '([^']+)'", out) if s != "inputs"]
    print(f"demo recipe{' (--fast)' if args.fast else ''}")
    print(f"{'step':<34}{'seconds':>9}{'ratio to full build':>22}")
    print(f"{'full build':<34}{full:>9.1f}{1.0:>22.3f}")
    print(f"{'no-op dvc repro':<34}{noop:>9.1f}{noop / full:>22.3f}")
    print(f"{'threshold change rebuild':<34}{threshold:>9.1f}{threshold / full:>22.3f}")
    print(f"stages rerun by the threshold change: {', '.join(rerun)}")


if __name__ == "__main__":
    main()
