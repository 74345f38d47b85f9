"""Watermark tag benchmark: LAION's efficientnet_b3 + head (random weights, LAION's state-dict layout)
scoring generated 256 px JPEGs the way the watermark stage does (decode and transform on
`--threads` threads, batches on the model), per device torch sees. Prints images/s of decoding
alone, of the model alone and of both, and what that means for 2.3B images. Issue #24; numbers in
docs/benchmarks.md.

    .venv/bin/python bench/bench_watermark.py [--images 256] [--batch-size 32] [--threads 2] [--device auto]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from laionbuild.models.watermark import WatermarkScorer, build_model  # noqa: E402

LAION_2B_EN = 2_322_161_808


def jpegs(n: int, size: int = 256) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        # smooth noise compresses like a photo, not like white noise
        small = rng.integers(0, 256, (size // 16, size // 16, 3), np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "watermark_model_v1.pt"
        torch.manual_seed(0)
        torch.save(build_model().state_dict(), weights)
        scorer = WatermarkScorer(weights, device=args.device)
    data = jpegs(args.images)
    print(f"device {scorer.device}, {args.images} images of 256 px, batch {args.batch_size}, "
          f"{args.threads} decode threads, torch {torch.__version__} ({torch.get_num_threads()} CPU threads)")

    def tensor(b: bytes):
        return scorer.transform(Image.open(io.BytesIO(b)))

    with ThreadPoolExecutor(args.threads) as pool:
        start = time.perf_counter()
        tensors = list(pool.map(tensor, data))
        decode = args.images / (time.perf_counter() - start)
        batches = [torch.stack(tensors[i:i + args.batch_size]) for i in range(0, len(tensors), args.batch_size)]
        scorer.score_tensors(batches[0])  # warm-up (cuDNN autotune, allocator)
        if scorer.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            scorer.score_tensors(batch)
        model = args.images / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, len(data), args.batch_size):
            scorer.score_tensors(torch.stack(list(pool.map(tensor, data[i:i + args.batch_size]))))
        both = args.images / (time.perf_counter() - start)
    print(f"decode + transform: {decode:8.1f} images/s")
    print(f"model:              {model:8.1f} images/s")
    print(f"both (the stage):   {both:8.1f} images/s  (model alone / both = {model / both:.2f})")
    hours = LAION_2B_EN / both / 3600
    print(f"LAION-2B-en ({LAION_2B_EN:,} images) at this rate: {hours:,.0f} hours on this machine")


if __name__ == "__main__":
    main()
