"""Download and face-tagging benchmark, side by side in one run (issue #4).

1. The download stage (`laionbuild stage download`: URL policy, host spreading, the policy
   opener in every worker, per-row funnel) vs raw `img2dataset.download` on the same input and
   settings, torch refused in both (laionbuild.web.without_torch), over
   loopback (N generated JPEGs served from a folder). Prints both throughputs and
   ours/raw (goal >= 0.95). Runs alternate (raw, ours, raw, ours...) to spread the noise.
2. The faces stage with the default offline detector (opencv_haar) on the downloaded shards:
   images/s with one process and with two (per core = one process).

3. The URL policy alone (bench/bench_policy.py, run at the end): CPU per request and requests/s
   with 1 and 2 worker processes, beside direct fetches and the old central proxy.

    .venv/bin/python bench/bench_download.py [--images 1000] [--repeat 2] [--policy-requests 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from laionbuild.web.local_server import serve_folder  # noqa: E402

SETTINGS = dict(image_size=256, resize_mode="border", encode_format="jpg", encode_quality=95,
                number_sample_per_shard=250, processes_count=2, thread_count=32, timeout=10, retries=0)

RAW = """
import sys
from laionbuild.web import without_torch
without_torch.enable()  # as the stage does: raw img2dataset pays no torch import in its spawned workers
import img2dataset
if __name__ == "__main__":  # img2dataset's workers are spawned: they re-import this file
    img2dataset.download(url_list=sys.argv[1], input_format="parquet", url_col="url", caption_col="caption",
                         output_folder=sys.argv[2], output_format="webdataset", distributor="multiprocessing",
                         enable_wandb=False, {settings})
"""


def photos(folder: Path, n: int) -> None:
    """n distinct 512x384 JPEGs: gradients and shapes, and every 5th a sample photo with a face."""
    from PIL import Image, ImageDraw
    from skimage import data

    folder.mkdir(parents=True)
    face = Image.fromarray(data.astronaut()).resize((512, 512))
    for i in range(n):
        if i % 5 == 0:
            image = face.rotate(i % 7 - 3)
        else:
            image = Image.new("RGB", (512, 384), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
            ImageDraw.Draw(image).ellipse((i % 200, i % 100, 300 + i % 200, 250 + i % 100), fill=(i % 256, 80, 160))
        image.save(folder / f"{i}.jpg", quality=90)


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--policy-requests", type=int, default=2000,
                        help="requests of the policy-only capacity test (bench_policy.py); 0: skip it")
    args = parser.parse_args()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", NO_ALBUMENTATIONS_UPDATE="1",
               HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos(tmp / "web", args.images)
        with serve_folder(tmp / "web") as base:
            urls = [f"{base}/{i}.jpg" for i in range(args.images)]
            source = tmp / "source"
            source.mkdir()
            pq.write_table(pa.table({"SAMPLE_ID": list(range(args.images)), "URL": urls,
                                     "TEXT": [f"picture {i}" for i in range(args.images)],
                                     "NSFW": ["UNLIKELY"] * args.images}), source / "part-00000.parquet")
            raw_input = tmp / "raw_input.parquet"
            pq.write_table(pa.table({"url": urls, "caption": [f"picture {i}" for i in range(args.images)]}), raw_input)
            raw_script = tmp / "raw.py"
            raw_script.write_text(RAW.format(settings=", ".join(f"{k}={v!r}" for k, v in SETTINGS.items())))

            project = tmp / "project"
            project.mkdir()
            # the demo recipe's source layout (part-00000.parquet), pointed at the generated part
            overrides = [f"source.base_url={source}", "source.num_parts=1", "subset.parts=[0]",
                         "~source.columns.sample_id", "~source.columns.width", "~source.columns.height",
                         "~source.columns.license", "~source.columns.similarity",
                         "download.local_server.host=null", "download.local_server.root=null",
                         "download.allow_private_urls=true", "tag.faces.detector=opencv_haar",
                         *[f"download.{k}={v}" for k, v in SETTINGS.items()]]
            subprocess.run([str(BIN / "laionbuild"), "compose", "--conf-dir", str(ROOT / "conf"), *overrides],
                           cwd=project, env=env, check=True, stdout=subprocess.DEVNULL)
            for stage in ("fetch", "prepare"):
                subprocess.run([str(BIN / "laionbuild"), "stage", stage, "--part", "0"], cwd=project, env=env,
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run([str(BIN / "laionbuild"), "stage", "dedup"], cwd=project, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            raw_times, ours_times = [], []
            for r in range(args.repeat):
                raw_times.append(timed([sys.executable, str(raw_script), str(raw_input), str(tmp / f"raw_{r}")],
                                       tmp, env))
                ours_times.append(timed([str(BIN / "laionbuild"), "stage", "download", "--part", "0"], project, env))
        raw, ours = min(raw_times), min(ours_times)
        print(f"download of {args.images} images over loopback, {SETTINGS['processes_count']} processes x "
              f"{SETTINGS['thread_count']} threads, best of {args.repeat}:")
        print(f"  raw img2dataset   {raw:7.1f} s  {args.images / raw:7.1f} img/s")
        print(f"  laionbuild stage  {ours:7.1f} s  {args.images / ours:7.1f} img/s")
        print(f"  ours/raw throughput {raw / ours:.2f}   (goal >= 0.95)")

        faces = []
        for processes in (1, 2):
            subprocess.run([str(BIN / "laionbuild"), "compose", "--conf-dir", str(ROOT / "conf"), *overrides,
                            f"tag.faces.processes={processes}"], cwd=project, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            seconds = timed([str(BIN / "laionbuild"), "stage", "faces", "--part", "0"], project, env)
            faces.append((processes, seconds))
        tagged = pq.read_metadata(project / "data/faces/part_0/faces.parquet").num_rows
        print(f"face tagging (opencv_haar) of {tagged} downloaded {SETTINGS['image_size']}px images, whole stage:")
        for processes, seconds in faces:
            print(f"  {processes} process(es)  {seconds:6.1f} s  {tagged / seconds:7.1f} img/s  "
                  f"{tagged / seconds / processes:7.1f} img/s per core")
    if args.policy_requests:  # the URL policy's own cost and capacity, beside direct fetches and the old proxy
        print("URL policy alone (bench/bench_policy.py):", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_policy.py")),
                        "--requests", str(args.policy_requests)], check=True)


if __name__ == "__main__":
    main()
