"""Embed and index benchmark, side by side in one run (issue #5).

1. The embed stage (`laionbuild.stages.embed.run(cfg, part)`: clip-retrieval's Runner blocks
   in-process + key order + model.json) vs raw `clip_inference.main(...)` with the same
   shards, model, batch size and workers, vs a plain open_clip loop (tar read, JPEG decode, preprocess, tokenize, encode_image
   + encode_text in batches of the same size, normalise, float16: the work the stage has to
   do), all on the same webdataset shards (img2dataset's layout) and the same weights
   (`embed.pretrained=random`: untrained, offline). Each run is a fresh process; imports are
   timed apart. Hooks (all_clip's load and warm-up, clip_inference's per-batch stats) split
   each call into its data loop (steady throughput) and the rest (start-up: model load,
   warm-up, workers, logger processes, output); `--small n` adds a second part size and the
   two-size estimate: steady = (N - n) / (T - t), start-up = T - N / steady.
   Goals: stage/clip_inference >= 0.95, stage/raw forward >= 0.9 (samples/s of the call).
2. The index stage (`laionbuild.stages.index.run(cfg)`: autofaiss build_index, then the index
   report) vs raw `autofaiss.build_index` with the same arguments on the same embeddings.
   Goal: stage build time / raw <= 1.05; the report's extra time is shown apart.

    .venv/bin/python bench/bench_embed.py [--samples 256] [--small 0] [--batch-size 32]
        [--shards 2] [--workers 2] [--index-rows 50000] [--dim 512] [--repeat 1]
    .venv/bin/python bench/bench_embed.py --variants 0:32 2:8 2:32:nowarmup:nologger   # knobs

`--variants W:B[:nowarmup][:nologger]` adds raw clip_inference runs on the big part with
num_prepro_workers=W, batch_size=B, and optionally all_clip's warm-up skipped and/or its two
spawned logger processes replaced by an in-process no-op (monkeypatches, not arguments),
compared to the raw forward at --batch-size.

The machine is shared: the header and footer print the load average; numbers taken while
other work runs are not comparable across runs (the ratios, measured back to back, hold up
better; CPU s, user+sys including helper processes, moves least with the load).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "WANDB_MODE": "disabled",
       "CUDA_VISIBLE_DEVICES": ""}
BIG, SMALL = 0, 1  # part ids (the demo recipe has parts 0..2)


# ---------------------------------------------------------------------------------------------
# inputs


def timing(marks: dict, name: str, call):
    """`call`, recording its wall time in marks[name] on every call."""
    def run(*a, **k):
        t = time.perf_counter()
        try:
            return call(*a, **k)
        finally:
            marks[name] = time.perf_counter() - t

    return run


def write_part(project: Path, part: int, n: int, shards: int, image_size: int, seed: int) -> None:
    """n samples in img2dataset's webdataset layout: KEY.jpg, KEY.json (with laionbuild_key),
    KEY.txt per sample, contiguous shard names, plus the stats.json the embed stage reads."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed + part)
    folder = project / f"data/images/part_{part}"
    folder.mkdir(parents=True)
    per_shard = -(-n // shards)
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
    shapes = ["circle", "square", "triangle", "star", "cat", "house", "tree", "car"]
    row = 0
    for shard in range(shards):
        count = min(per_shard, n - row)
        if count <= 0:
            break
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(count):
                key = f"{shard:05d}{i:04d}"
                # smooth colour field + noise: JPEG size and decode cost like a real thumbnail
                low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(low).resize((image_size, image_size), Image.BICUBIC)
                pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (image_size, image_size, 3))
                buf = io.BytesIO()
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
                caption = f"a {colours[row % 8]} {shapes[(row // 8) % 8]} number {row} on a {colours[(row // 3) % 8]} background"
                meta = {"laionbuild_key": f"{part:05d}{row:09d}", "caption": caption,
                        "url": f"http://bench.invalid/{part}/{row}.jpg", "key": key, "status": "success",
                        "error_message": None, "width": image_size, "height": image_size,
                        "original_width": image_size * 2, "original_height": image_size * 2, "exif": "{}"}
                for ext, data in (("jpg", buf.getvalue()), ("json", json.dumps(meta).encode()),
                                  ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
                row += 1
    (folder / "stats.json").write_text(json.dumps({"counts": {"download_attempted": n, "download_failed": 0,
                                                              "downloaded_ok": n}, "failures": {}}))


def write_embeddings(project: Path, rows: int, dim: int, seed: int) -> None:
    """data/embeddings/{img_emb,text_emb}/..._0.npy as the assemble stage writes them (float16,
    L2-normalised); image vectors clustered a little, text = image + noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim)).astype(np.float32)
    img = centres[rng.integers(0, 256, rows)] + 0.7 * rng.standard_normal((rows, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    text = img + 0.5 * rng.standard_normal((rows, dim)).astype(np.float32) / np.sqrt(dim) * 4
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    for kind, array in (("img_emb", img), ("text_emb", text)):
        (project / f"data/embeddings/{kind}").mkdir(parents=True, exist_ok=True)
        np.save(project / f"data/embeddings/{kind}/{kind}_0.npy", array.astype(np.float16))


# ---------------------------------------------------------------------------------------------
# child processes: one measurement each, in a fresh interpreter, cwd = the project


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class _InProcessLogger:
    """Stand-in for clip_inference's LoggerReader/LoggerWriter (variant `nologger`): each of
    those starts a *spawned* process that imports all of clip_retrieval (torch,
    sentence_transformers, ...) just to write/read a stats json."""

    def __init__(self, *args, **kwargs):
        pass

    def start(self):
        pass

    def end(self):
        pass

    def __call__(self, stats):
        pass


def _hook_clip_inference(marks: dict, no_warmup: bool = False, no_logger: bool = False) -> None:
    """Time all_clip's model load and warm-up, and collect clip_inference's per-batch stats (the
    dicts its Runner hands to LoggerWriter in this process). Variants: skip all_clip's warm-up,
    replace the spawned logger processes by an in-process no-op."""
    import importlib

    import all_clip.main as acm
    from clip_retrieval.clip_inference.logger import LoggerWriter

    # not `import clip_retrieval.clip_inference.main`: clip_retrieval/__init__ shadows the
    # subpackage with a function of the same name
    cim = importlib.import_module("clip_retrieval.clip_inference.main")

    load, warm = acm.load_clip_without_warmup, acm.warmup

    def timed_load(*a, **k):
        start = time.perf_counter()
        marks.setdefault("t_load_start", start)
        try:
            return load(*a, **k)
        finally:
            marks["model_load"] = marks.get("model_load", 0.0) + time.perf_counter() - start

    def timed_warmup(*a, **k):
        start = time.perf_counter()
        try:
            if not no_warmup:
                warm(*a, **k)
        finally:
            marks["warmup"] = marks.get("warmup", 0.0) + time.perf_counter() - start
            marks["t_warm_end"] = time.perf_counter()

    acm.load_clip_without_warmup, acm.warmup = timed_load, timed_warmup
    import laionbuild.models.clip as models

    md5 = models._file_md5

    timed_md5 = timing(marks, "checkpoint md5", md5)

    models._file_md5 = timed_md5
    batches = marks.setdefault("batches", [])
    writer_cls = LoggerWriter
    if no_logger:
        cim.LoggerReader = writer_cls = _InProcessLogger
        importlib.import_module("clip_retrieval.clip_inference.worker").LoggerWriter = _InProcessLogger
    logger_call = writer_cls.__call__

    def record(self, stats):
        batches.append({**stats, "t_end": time.perf_counter()})
        return logger_call(self, stats)

    writer_cls.__call__ = record
    # the embed stage's local path runs clip-retrieval's Runner with an in-process stats logger
    from laionbuild.stages import embed as stage

    stage_call = stage._StatsLogger.__call__

    def stage_record(self, stats):
        batches.append({**stats, "t_end": time.perf_counter()})
        return stage_call(self, stats)

    stage._StatsLogger.__call__ = stage_record
    def timed(call, record_args: bool = False):
        def run(*a, **k):
            start = time.perf_counter()
            marks["t_main_start"] = start
            if record_args:
                marks["clip_args"] = {key: v for key, v in k.items() if key not in ("input_dataset", "output_folder")}
            try:
                return call(*a, **k)
            finally:
                marks["clip_inference"] = time.perf_counter() - start
                marks["t_main_end"] = time.perf_counter()

        return run

    stage._run_local = timed(stage._run_local)  # the stage's clip-retrieval call (its Runner, in-process)
    cim.main = timed(cim.main, record_args=True)


def child_clip(part: int, workers: int | None, batch: int | None, no_warmup: bool, no_logger: bool) -> dict:
    """Raw clip_inference, with the arguments the embed stage passes."""
    start = time.perf_counter()
    import importlib

    import open_clip  # noqa: F401  (imported lazily by all_clip and laionbuild.models.clip: count it as an import)
    import torch  # noqa: F401

    cim = importlib.import_module("clip_retrieval.clip_inference.main")

    from laionbuild.models.clip import resolve
    from laionbuild.recipe.schema import load_params
    from laionbuild.shards.storage import part_shards
    from laionbuild.stages.embed import _brace_pattern
    imports = time.perf_counter() - start
    cfg = load_params("params.yaml")
    model = resolve(cfg.embed)
    shards = part_shards(Path(f"data/images/part_{part}"))
    marks: dict = {"imports": imports}
    _hook_clip_inference(marks, no_warmup, no_logger)
    out = Path(f"data/.bench/clip_part_{part}_{os.getpid()}")
    cpu_self, cpu_children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    cim.main(input_dataset=_brace_pattern(shards), output_folder=str(out), input_format="webdataset",
             enable_text=True, enable_image=True, enable_metadata=True,
             batch_size=batch or cfg.embed.batch_size,
             num_prepro_workers=min(cfg.embed.num_prepro_workers if workers is None else workers, len(shards)),
             clip_model=model.clip_model, use_jit=False, output_partition_count=1,
             distribution_strategy="sequential")
    marks["call"] = time.perf_counter() - start
    marks["cpu_self"] = _cpu(resource.RUSAGE_SELF) - cpu_self
    marks["cpu_children"] = _cpu(resource.RUSAGE_CHILDREN) - cpu_children
    import numpy as np

    marks["samples"] = int(np.load(out / "img_emb" / "img_emb_0.npy", mmap_mode="r").shape[0])
    import shutil

    shutil.rmtree(out)
    return marks


def child_stage(part: int) -> dict:
    start = time.perf_counter()
    import importlib

    import open_clip  # noqa: F401
    import torch  # noqa: F401

    importlib.import_module("clip_retrieval.clip_inference.main")

    from laionbuild.recipe.schema import load_params
    from laionbuild.stages import embed
    imports = time.perf_counter() - start
    cfg = load_params("params.yaml")
    marks: dict = {"imports": imports}
    _hook_clip_inference(marks)
    cpu_self, cpu_children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    embed.run(cfg, part)
    marks["call"] = time.perf_counter() - start
    marks["cpu_self"] = _cpu(resource.RUSAGE_SELF) - cpu_self
    marks["cpu_children"] = _cpu(resource.RUSAGE_CHILDREN) - cpu_children
    marks["t_call_start"] = start
    import numpy as np

    marks["samples"] = int(np.load(f"data/embed/part_{part}/img_emb/img_emb_0.npy", mmap_mode="r").shape[0])
    return marks


def child_raw(part: int) -> dict:
    """The work itself: read the tars, decode + preprocess each image, tokenize the captions,
    encode_image + encode_text per batch, normalise, float16 (what clip_inference returns)."""
    start = time.perf_counter()
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    from laionbuild.models.clip import resolve
    from laionbuild.recipe.schema import load_params
    from laionbuild.stages.download import shard_files
    imports = time.perf_counter() - start
    cfg = load_params("params.yaml")
    checkpoint = resolve(cfg.embed).checkpoint
    batch_size = cfg.embed.batch_size
    marks: dict = {"imports": imports, "decode": 0.0, "forward": 0.0}
    cpu_self = _cpu(resource.RUSAGE_SELF)
    start = time.perf_counter()
    # as all_clip loads it (open_clip:ARCH/CHECKPOINT)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.embed.model, pretrained=checkpoint, device="cpu")
    tokenizer = open_clip.get_tokenizer(cfg.embed.model)
    marks["model_load"] = time.perf_counter() - start
    keys, images, texts, img_out, text_out, out_keys = [], [], [], [], [], []

    def forward() -> None:
        t = time.perf_counter()
        tokens = tokenizer(texts)
        x = torch.stack(images)
        marks["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            for encode, data, sink in ((model.encode_image, x, img_out), (model.encode_text, tokens, text_out)):
                features = encode(data)
                features /= features.norm(dim=-1, keepdim=True)
                sink.append(features.to(torch.float16).numpy())
        marks["forward"] += time.perf_counter() - t
        out_keys.extend(keys)
        keys.clear(), images.clear(), texts.clear()

    for shard in shard_files(Path(f"data/images/part_{part}")):
        t = time.perf_counter()
        sample: dict = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                stem, ext = member.name.rsplit(".", 1)
                sample[ext] = tar.extractfile(member).read()
                if not all(e in sample for e in ("jpg", "txt", "json")):
                    continue
                images.append(preprocess(Image.open(io.BytesIO(sample["jpg"]))))
                texts.append(sample["txt"].decode("utf-8"))
                keys.append(json.loads(sample["json"])["laionbuild_key"])
                sample = {}
                if len(images) == batch_size:
                    marks["decode"] += time.perf_counter() - t
                    forward()
                    t = time.perf_counter()
        marks["decode"] += time.perf_counter() - t
    if images:
        forward()
    marks["call"] = time.perf_counter() - start
    marks["cpu_self"] = _cpu(resource.RUSAGE_SELF) - cpu_self
    marks["cpu_children"] = 0.0
    order = np.argsort(np.array(out_keys), kind="stable")
    img = np.concatenate(img_out)[order]
    Path("data/.bench").mkdir(parents=True, exist_ok=True)
    np.save(f"data/.bench/raw_img_part_{part}.npy", img)
    marks["samples"] = len(out_keys)
    return marks


def child_index(kind: str) -> dict:
    start = time.perf_counter()
    import autofaiss
    import faiss  # noqa: F401

    from laionbuild.recipe.schema import load_params
    from laionbuild.stages import index as index_stage
    imports = time.perf_counter() - start
    cfg = load_params("params.yaml")
    marks: dict = {"imports": imports}
    if kind == "raw":
        import logging

        c = cfg.index
        from laionbuild.project.layout import EMBEDDINGS

        out = Path("data/.bench/index_raw")
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        autofaiss.build_index(embeddings=str(EMBEDDINGS / "img_emb"), index_path=str(out / "image.index"),
                              index_infos_path=str(out / "image_infos.json"), index_key=c.index_key,
                              metric_type=c.metric_type, max_index_memory_usage=c.max_index_memory_usage,
                              current_memory_available=c.current_memory_available,
                              max_index_query_time_ms=c.max_index_query_time_ms, nb_cores=c.nb_cores or os.cpu_count(),
                              save_on_disk=True, verbose=logging.WARNING)
        marks["build_index"] = marks["call"] = time.perf_counter() - start
        marks["index_key"] = json.loads((out / "image_infos.json").read_text()).get("index_key")
        return marks
    build, report = autofaiss.build_index, index_stage.report

    timed_build = timing(marks, "build_index", build)

    timed_report = timing(marks, "report", report)

    autofaiss.build_index, index_stage.report = timed_build, timed_report
    exact = getattr(index_stage, "exact_search", None)
    if exact is not None:  # the report's exact top-k (the rest: load queries, index.search, latency loop)

        def timed_exact(*a, **k):
            t = time.perf_counter()
            try:
                return exact(*a, **k)
            finally:
                marks["exact_search"] = marks.get("exact_search", 0.0) + time.perf_counter() - t

        index_stage.exact_search = timed_exact
    start = time.perf_counter()
    index_stage.run(cfg)
    marks["call"] = time.perf_counter() - start
    marks["index_key"] = json.loads(Path("data/index/image_infos.json").read_text()).get("index_key")
    marks["metrics"] = json.loads(Path("data/metrics/index.json").read_text())
    return marks


def child_main(args) -> None:
    os.environ.update(ENV)
    sys.path.insert(0, str(ROOT))
    mode = args.child
    if mode == "prepare":
        from laionbuild.models.clip import resolve
        from laionbuild.recipe.schema import load_params

        resolve(load_params("params.yaml").embed)  # writes the random checkpoint once
        result: dict = {}
    elif mode == "clip":
        result = child_clip(args.part, args.variant_workers, args.variant_batch, args.no_warmup, args.no_logger)
    elif mode == "stage":
        result = child_stage(args.part)
    elif mode == "raw":
        result = child_raw(args.part)
    else:
        result = child_index(mode.split("-", 1)[1])
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# parent


def measure(project: Path, log: Path, mode: str, part: int | None = None, extra: tuple[str, ...] = ()) -> dict:
    result = project / "data/.bench" / f"result_{mode}_{part}_{time.monotonic_ns()}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--result", str(result), *extra]
    if part is not None:
        cmd += ["--part", str(part)]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **ENV)
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n==== {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    marks = json.loads(result.read_text())
    marks["process"] = time.perf_counter() - start
    return marks


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda m: m["call"])


def clip_breakdown(m: dict) -> dict:
    """Where the call's time goes, from the hooks (seconds)."""
    batches = m.get("batches", [])
    t0 = m.get("t_call_start", m["t_main_start"])
    # (the stage: clip-retrieval's Runner in-process, laionbuild.stages.embed._run_local)
    out = {"before clip_inference": m["t_main_start"] - t0,
           "clip_inference set-up": m.get("t_load_start", m["t_main_start"]) - m["t_main_start"],
           "model load": m.get("model_load", 0.0), "warm-up": m.get("warmup", 0.0)}
    if batches:
        first = batches[0]
        out["first batch wait (workers start)"] = first["read_duration"]
        out["later batch waits (reader)"] = sum(b["read_duration"] for b in batches[1:])
        out["inference"] = sum(b["inference_duration"] for b in batches)
        out["writer.add"] = sum(b["write_duration"] for b in batches)
        accounted = m["t_warm_end"] - t0 + sum(b["read_duration"] + b["inference_duration"] + b["write_duration"]
                                               for b in batches)
        out["between warm-up and 1st batch"] = (batches[0]["t_end"] - sum(
            batches[0][k] for k in ("read_duration", "inference_duration", "write_duration"))) - m["t_warm_end"]
        accounted += out["between warm-up and 1st batch"]
        out["flush + logger join"] = m["t_main_end"] - batches[-1]["t_end"]
        accounted += out["flush + logger join"]
    else:
        accounted = 0.0
    out["after clip_inference (stage)"] = m["call"] - (m["t_main_end"] - t0)
    out["  of which checkpoint md5"] = m.get("checkpoint md5", 0.0)
    out["other"] = m["call"] - accounted - out["after clip_inference (stage)"] if batches else 0.0
    out["helper processes CPU s"] = m["cpu_children"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="samples of the big part")
    parser.add_argument("--small", type=int, default=0,
                        help="also a part of this many samples: start-up and steady rate from two sizes too")
    parser.add_argument("--batch-size", type=int, default=32, help="embed.batch_size (the demo recipe's 32)")
    parser.add_argument("--workers", type=int, default=2, help="embed.num_prepro_workers (capped at --shards)")
    parser.add_argument("--shards", type=int, default=2, help="webdataset shards per part")
    parser.add_argument("--image-size", type=int, default=256, help="JPEG side (download.image_size default)")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--index-rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=1, help="best of N for every measurement")
    parser.add_argument("--variants", nargs="*", default=[], metavar="W:B[:nowarmup][:nologger]",
                        help="extra raw clip_inference runs on the big part: num_prepro_workers:batch_size")
    parser.add_argument("--no-index", action="store_true")
    parser.add_argument("--no-embed", action="store_true")
    parser.add_argument("--keep", metavar="DIR", help="build the project in DIR and keep it (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--part", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--variant-workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-warmup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-logger", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    if args.small and not 0 < args.small < args.samples:
        parser.error("--small must be below --samples")

    os.environ.update(ENV)
    tmp = None
    if args.keep:
        project = Path(args.keep).resolve()
        if project.exists() and any(project.iterdir()):
            parser.error(f"--keep {project}: not empty")
        project.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_embed_")
        project = Path(tmp.name)
    log = project / "bench.log"
    try:
        env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        subprocess.run([str(BIN / "laionbuild"), "compose", "--conf-dir", str(ROOT / "conf"), "recipe=demo",
                        f"embed.model={args.model}", "embed.pretrained=random", "embed.device=cpu",
                        f"embed.batch_size={args.batch_size}", f"embed.num_prepro_workers={args.workers}"],
                       cwd=project, env=env, check=True, stdout=subprocess.DEVNULL)
        import torch  # only for the header

        threads = torch.get_num_threads()
        print(f"embed + index benchmark: {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), "
              f"{args.model} untrained (embed.pretrained=random), cpu; load average {_load()}")
        if not args.no_embed:
            run_embed(args, project, log)
        if not args.no_index:
            run_index(args, project, log)
        print(f"\nload average at the end {_load()}" + (f"; child logs: {log}" if args.keep else ""))
    finally:
        if tmp is not None:
            tmp.cleanup()


def _loop_seconds(m: dict) -> float:
    """Seconds of the data loop: raw forward: after the model load; clip_inference: its batches
    (reader wait + inference + writer.add, the first batch's wait for the workers included)."""
    if "batches" not in m:
        return m["call"] - m["model_load"]
    return sum(b["read_duration"] + b["inference_duration"] + b["write_duration"] for b in m["batches"])


def run_embed(args, project: Path, log: Path) -> None:
    start = time.perf_counter()
    sizes = [BIG] + ([SMALL] if args.small else [])
    write_part(project, BIG, args.samples, args.shards, args.image_size, seed=1)
    if args.small:
        write_part(project, SMALL, args.small, args.shards, args.image_size, seed=1)
    measure(project, log, "prepare")
    setup = time.perf_counter() - start
    workers = min(args.workers, args.shards)
    print(f"\n1. embed: a part of {args.samples} samples" + (f" (and one of {args.small})" if args.small else "")
          + f", {args.shards} shards each, {args.image_size}px JPEGs, batch_size={args.batch_size}, "
          f"num_prepro_workers={workers}, best of {args.repeat} (inputs + checkpoint made in {setup:.0f} s)")
    runs: dict = {(w, p): [] for w in ("raw", "clip", "stage") for p in sizes}
    for _ in range(args.repeat):
        for part in sizes:  # methods back to back, so drift in the machine's load hits them alike
            for what in ("raw", "clip", "stage"):
                runs[(what, part)].append(measure(project, log, what, part))
    r = {k: best(v) for k, v in runs.items()}
    n, small = args.samples, args.small
    names = {"raw": "raw open_clip forward", "clip": "raw clip_inference", "stage": "embed stage"}
    rows = {}
    for what in ("raw", "clip", "stage"):
        big = r[(what, BIG)]
        loop = _loop_seconds(big)
        cpu = big["cpu_self"] + big["cpu_children"]
        rows[what] = {"call": big["call"], "e2e": n / big["call"], "loop": loop, "steady": n / loop,
                      "startup": big["call"] - loop, "cpu": cpu, "per_cpu": n / cpu, "imports": big["imports"]}
        if args.small:
            sm = r[(what, SMALL)]
            rows[what]["small"] = sm["call"]
            rows[what]["steady2"] = (n - small) / (big["call"] - sm["call"]) if big["call"] > sm["call"] else float("nan")
            rows[what]["startup2"] = big["call"] - n / rows[what]["steady2"]
        if big["samples"] != n:
            print(f"  WARNING: {names[what]} embedded {big['samples']} of {n} samples")
    two = f"{'small s':>9}{'2-size steady/s':>16}{'start-up s':>11}" if args.small else ""
    print(f"{'':<23}{'call s':>7}{'samples/s':>10}{'loop s':>8}{'steady/s':>9}{'start-up s':>11}{'CPU s':>7}"
          f"{'imports s':>10}{two}")
    for what, row in rows.items():
        extra = (f"{row['small']:>9.1f}{row['steady2']:>16.2f}{row['startup2']:>11.1f}" if args.small else "")
        print(f"{names[what]:<23}{row['call']:>7.1f}{row['e2e']:>10.2f}{row['loop']:>8.1f}{row['steady']:>9.2f}"
              f"{row['startup']:>11.1f}{row['cpu']:>7.1f}{row['imports']:>10.1f}{extra}")
    print("  call s: wall time of the stage call / clip_inference.main / model load + loop, in a process that has\n"
          "  done its imports; samples/s = samples / call s; loop s: the data loop (decode + encode; for\n"
          "  clip_inference its batches), steady/s = samples / loop s, start-up s = call s - loop s (model load,\n"
          "  warm-up, workers, logger processes, output); CPU s: user+sys incl. helper processes")
    print(f"{'ratio':<43}{'samples/s':>10}{'steady/s':>9}{'per CPU s':>10}{'goal':>9}")
    for label, a, b, goal in (("embed stage / raw clip_inference", "stage", "clip", ">= 0.95"),
                              ("embed stage / raw open_clip forward", "stage", "raw", ">= 0.9"),
                              ("raw clip_inference / raw open_clip forward", "clip", "raw", "")):
        x, y = rows[a], rows[b]
        print(f"{label:<43}{x['e2e'] / y['e2e']:>10.3f}{x['steady'] / y['steady']:>9.3f}"
              f"{x['per_cpu'] / y['per_cpu']:>10.3f}{goal:>9}")
    extra = rows["stage"]["call"] - rows["raw"]["call"]
    if extra > 0:
        # what the stage adds is fixed per part (warm-up, logger processes, checkpoint md5...): with
        # the raw forward's start-up s_r and steady rate v_r, stage/raw at N = (s_r + N/v_r) / (s_r + N/v_r + extra)
        def ratio(count: float) -> float:
            raw_time = rows["raw"]["startup"] + count / rows["raw"]["steady"]
            return raw_time / (raw_time + extra)

        reach = {goal: next(c for c in (2 ** k for k in range(4, 40)) if ratio(c) >= goal) for goal in (0.9, 0.95)}
        print(f"  the stage's extra {extra:.1f} s is per part: at these rates stage/raw forward would be "
              f"{ratio(10_000):.3f} at 10000 samples, {ratio(100_000):.3f} at 100000; >= 0.9 from ~{reach[0.9]}, "
              f">= 0.95 from ~{reach[0.95]} samples (powers of 2)")

    raw_big = r[("raw", BIG)]
    print(f"where the time goes, big part ({n} samples), seconds:")
    breakdowns = {w: clip_breakdown(r[(w, BIG)]) for w in ("clip", "stage")}
    print(f"{'':<36}{'clip_inference':>15}{'embed stage':>13}")
    for key in breakdowns["stage"]:
        print(f"{key:<36}{breakdowns['clip'].get(key, 0.0):>15.2f}{breakdowns['stage'][key]:>13.2f}")
    print(f"{'main process CPU s':<36}{r[('clip', BIG)]['cpu_self']:>15.2f}{r[('stage', BIG)]['cpu_self']:>13.2f}")
    print(f"raw open_clip forward: model load {raw_big['model_load']:.2f}, tar read + decode + preprocess + "
          f"tokenize {raw_big['decode']:.2f}, encode + normalise {raw_big['forward']:.2f}, "
          f"CPU s {raw_big['cpu_self']:.1f}")
    import numpy as np

    ours = np.load(project / f"data/embed/part_{BIG}/img_emb/img_emb_0.npy").astype(np.float32)
    raw_img = np.load(project / f"data/.bench/raw_img_part_{BIG}.npy").astype(np.float32)
    if ours.shape == raw_img.shape:
        print(f"check: embed stage vs raw forward image embeddings (key order): max |diff| "
              f"{np.abs(ours - raw_img).max():.4f}")
    else:
        print(f"check: shapes differ: stage {ours.shape} vs raw {raw_img.shape}")

    if args.variants:
        print(f"raw clip_inference variants on the big part (vs raw forward at batch_size={args.batch_size}, "
              f"{rows['raw']['e2e']:.2f} samples/s):")
        print(f"{'workers:batch':<24}{'call s':>7}{'samples/s':>10}{'/ raw fwd':>10}{'CPU s':>7}{'CPU / raw':>10}"
              f"{'load s':>7}{'warm-up s':>10}{'1st wait s':>11}{'infer s':>8}{'tail s':>7}")
        for variant in args.variants:
            parts = variant.split(":")
            extra = ("--variant-workers", parts[0], "--variant-batch", parts[1])
            unknown = set(parts[2:]) - {"nowarmup", "nologger"}
            if unknown:
                sys.exit(f"--variants {variant}: unknown option(s) {sorted(unknown)} (nowarmup, nologger)")
            extra += ("--no-warmup",) * ("nowarmup" in parts[2:]) + ("--no-logger",) * ("nologger" in parts[2:])
            m = best([measure(project, log, "clip", BIG, extra) for _ in range(args.repeat)])
            b = clip_breakdown(m)
            cpu = m["cpu_self"] + m["cpu_children"]
            print(f"{variant:<24}{m['call']:>7.1f}{n / m['call']:>10.2f}{n / m['call'] / rows['raw']['e2e']:>10.3f}"
                  f"{cpu:>7.1f}{cpu / rows['raw']['cpu']:>10.3f}{b['model load']:>7.2f}{b['warm-up']:>10.2f}"
                  f"{b.get('first batch wait (workers start)', 0):>11.2f}{b.get('inference', 0):>8.2f}"
                  f"{b.get('flush + logger join', 0):>7.2f}")
        print("  CPU / raw: CPU s of the variant over the raw forward's (lower is better); tail: flush + logger join")


def run_index(args, project: Path, log: Path) -> None:
    start = time.perf_counter()
    write_embeddings(project, args.index_rows, args.dim, seed=2)
    setup = time.perf_counter() - start
    runs: dict = {"raw": [], "stage": []}
    for _ in range(args.repeat):
        for kind in ("raw", "stage"):
            runs[kind].append(measure(project, log, f"index-{kind}"))
    raw, ours = best(runs["raw"]), best(runs["stage"])
    print(f"\n2. index: {args.index_rows} x {args.dim} float16 embeddings (made in {setup:.0f} s), "
          f"index.* defaults (autofaiss picked {ours['index_key']}), best of {args.repeat}")
    build = ours["call"] - ours["report"]
    print(f"{'':<44}{'seconds':>9}")
    print(f"{'raw autofaiss.build_index':<44}{raw['call']:>9.2f}")
    print(f"{'index stage, whole run(cfg)':<44}{ours['call']:>9.2f}")
    print(f"{'  of which build_index':<44}{ours['build_index']:>9.2f}")
    print(f"{'  of which read_index + log':<44}{build - ours['build_index']:>9.2f}")
    print(f"{'  of which report (extra)':<44}{ours['report']:>9.2f}")
    metrics = ours["metrics"]
    queries, p50 = metrics.get("queries", 0), metrics.get("latency_ms_p50", 0.0)
    loop = queries * p50 / 1000
    if "exact_search" in ours:
        print(f"{'    exact search of the queries':<44}{ours['exact_search']:>9.2f}")
    print(f"{f'    latency loop ({queries} single queries, ~p50)':<44}{loop:>9.2f}")
    if "exact_search" in ours:
        print(f"{'    batched index.search + loading, the rest':<44}{ours['report'] - ours['exact_search'] - loop:>9.2f}")
    print(f"{'ratio':<44}{'':>9}{'goal':>12}")
    print(f"{'index stage build (run - report) / raw':<44}{build / raw['call']:>9.3f}{'<= 1.05':>12}")
    print(f"{'index stage whole / raw (report included)':<44}{ours['call'] / raw['call']:>9.3f}")
    print(f"report: {metrics.get('queries')} queries, recall@1 {metrics.get('recall_at_1', float('nan')):.3f}, "
          f"recall@10 {metrics.get('recall_at_10', float('nan')):.3f}, p50 {metrics.get('latency_ms_p50', 0):.3f} ms, "
          f"size {metrics.get('size_bytes', 0) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
