"""The inputs check (issue #18): fingerprints of N remote source parts on a store that answers
each metadata request after a latency, checked concurrently (the stage's REMOTE_CHECKS at once)
against one at a time, side by side in one run. Prints both wall times and their ratio.

    .venv/bin/python bench/bench_inputs.py [--parts 400] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laionbuild.project import inputs  # noqa: E402
from laionbuild.recipe.schema import compose  # noqa: E402
from tests.test_file_inputs import FolderServer  # noqa: E402  (the tests' store on 127.0.0.1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", type=int, default=400)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "store"
        folder.mkdir()
        for part in range(args.parts):
            (folder / f"part-{part:05d}.parquet").write_bytes(f"part {part}".encode() * 100)
        os.chdir(tmp)
        with FolderServer(folder, delay=args.latency_ms / 1000) as server:
            cfg = compose([f"source.base_url={server.url}", f"source.num_parts={args.parts}",
                           f"subset.parts=[{','.join(map(str, range(args.parts)))}]",
                           "download.local_server.host=null", "download.local_server.root=null"], conf_dir=ROOT / "conf")
            timings = {}
            for label, at_once in (("concurrent", inputs.REMOTE_CHECKS), ("one at a time", 1)):
                inputs.REMOTE_CHECKS = at_once
                began = time.perf_counter()
                inputs.expected(cfg)
                timings[label] = time.perf_counter() - began
                print(f"{label:>14}: {timings[label]:6.2f} s for {args.parts} parts at {args.latency_ms:.0f} ms "
                      f"(most requests in flight: {server.most_in_flight})")
                server.most_in_flight = 0
    print(f"ratio one-at-a-time / concurrent: {timings['one at a time'] / timings['concurrent']:.1f}x")


if __name__ == "__main__":
    main()
