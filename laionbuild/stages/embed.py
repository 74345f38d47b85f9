"""embed: clip-retrieval inference over one part's shards -> image and text embeddings in
clip-retrieval's layout (`data/embed/part_N/{img_emb,text_emb,metadata}/..._0.npy|parquet`),
rows sorted by key (build order), plus
`model.json` saying which weights made them (and whether they are untrained). With
`embed.text_model`, that encoder embeds the captions (laionbuild/models/text_encoders.py) and
model.json names it under `text_model`."""

from __future__ import annotations

import io
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from laionbuild.models import text_encoders
from laionbuild.models.clip import describe, resolve
from laionbuild.project.atomic import atomic_dir, read_json, write_json
from laionbuild.project.files import by_number
from laionbuild.project.funnel import Counts
from laionbuild.project.layout import KEY_COLUMN, TMP, part_dir
from laionbuild.recipe.errors import InputError
from laionbuild.shards.storage import Shard, filesystem, is_url, join, part_shards, webdataset_url

log = logging.getLogger(__name__)
METADATA_COLUMNS = ["image_path", "caption", KEY_COLUMN, "url", "width", "height", "original_width",
                    "original_height"]


def _select_device(device: str) -> None:
    # clip_inference picks CUDA whenever it is visible; hide it for cpu, narrow it for cuda:N.
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]


def _absolute(shard: Shard) -> str:
    """A shard's location as executors' workers can open it (not relative to this directory)."""
    return shard.location if is_url(shard.location) else str(Path(shard.location).resolve())


def _brace_pattern(shards: list[Shard]) -> str:
    """clip_inference takes webdataset inputs as one brace pattern (it brace-expands a string)."""
    stems = [s.name for s in shards]
    folder = _absolute(shards[0]).rsplit("/", 1)[0]
    expected = [f"{i:0{len(stems[0])}d}" for i in range(int(stems[0]), int(stems[0]) + len(stems))]
    if stems != expected:
        raise RuntimeError(f"{folder}: shard names are not contiguous: {stems}")
    if len(stems) == 1:
        return webdataset_url(_absolute(shards[0]))
    return webdataset_url(f"{folder}/{{{stems[0]}..{stems[-1]}}}.tar")


def write_part(out: Path, img: np.ndarray, text: np.ndarray, metadata: pd.DataFrame) -> None:
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir()
    np.save(out / "img_emb" / "img_emb_0.npy", img)
    np.save(out / "text_emb" / "text_emb_0.npy", text)
    metadata.to_parquet(out / "metadata" / "metadata_0.parquet", index=False)


def _source_array(path: Path, array: str | None) -> np.ndarray:
    """The embeddings of a source.image_embeddings file: an .npy (memory-mapped), or the array
    `array` (embed.from_source_array) of an .npz (DataComp's per-shard features)."""
    loaded = np.load(path, mmap_mode="r")
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        if array is not None:
            raise InputError(f"{path}: one array (.npy), not an .npz: set embed.from_source_array=null")
        return loaded
    with loaded:
        if array not in loaded.files:
            raise InputError(f"{path}: no array `{array}` (embed.from_source_array); it has {', '.join(loaded.files)}")
        return loaded[array]


def from_source(cfg, part: int) -> None:
    """The part's rows' precomputed image embeddings (source.image_embeddings, fetched next to
    the metadata), gathered by source row in key order; their dtype is kept (LAION2B: float16).
    No text embeddings."""
    raw_dir = part_dir("fetch", part)
    fetched = read_json(raw_dir / "fetch.json")
    if "image_embeddings" not in fetched:
        raise RuntimeError(f"{raw_dir}: fetched without source.image_embeddings; rebuild fetch@{part}")
    emb_path = raw_dir / fetched["image_embeddings"]["file"]
    meta_path = raw_dir / fetched["file"]
    emb = _source_array(emb_path, cfg.embed.from_source_array)
    source_rows = pq.read_metadata(meta_path).num_rows if meta_path.suffix == ".parquet" else None
    if emb.ndim != 2 or (source_rows is not None and emb.shape[0] != source_rows):
        raise InputError(f"{emb_path}: shape {emb.shape} does not match {meta_path.name} "
                         f"({source_rows} rows): row i must embed metadata row i")
    table = pq.read_table(part_dir("dedup", part) / "metadata.parquet")
    keys = table.column("key").to_pylist()
    rows = np.fromiter((int(k[-9:]) for k in keys), np.int64, len(keys))  # key = 5-digit part + 9-digit row
    if len(rows) and rows.max() >= emb.shape[0]:
        raise InputError(f"{emb_path}: {emb.shape[0]} rows, but metadata row {int(rows.max())} is kept")
    img = np.asarray(emb[rows])
    metadata = pd.DataFrame({KEY_COLUMN: keys, "caption": table.column("caption").to_pylist(),
                             "url": table.column("url").to_pylist()})
    for column in ("width", "height"):
        if column in table.column_names:
            metadata["original_" + column] = table.column(column).to_pylist()
    counts = Counts()
    with atomic_dir(part_dir("embed", part)) as out:
        (out / "img_emb").mkdir()
        (out / "metadata").mkdir()
        np.save(out / "img_emb" / "img_emb_0.npy", img)
        metadata.to_parquet(out / "metadata" / "metadata_0.parquet", index=False)
        counts.set("embedded", len(metadata))
        counts.save(out)
        write_json(out / "model.json", {"architecture": cfg.source.image_embeddings_model or "unknown",
                                        "pretrained": None, "untrained": False, "dim": int(emb.shape[1]),
                                        "from_source": fetched["image_embeddings"]["url"],
                                        "array": cfg.embed.from_source_array,
                                        "dtype": str(emb.dtype)})
    log.info("part %d: %d precomputed image embeddings (%s) from %s", part, len(img), emb.dtype, emb_path.name)


class _StatsLogger:
    """clip-retrieval's per-partition stats, kept in-process: its LoggerWriter/LoggerReader
    spawn two processes that import all of clip_retrieval only to print samples/s (the cost
    is in docs/benchmarks.md). Same interface (start, __call__, end)."""

    def __init__(self, part: str):
        self.part, self.samples, self.seconds = part, 0, 0.0

    def start(self) -> None:
        self.began = time.perf_counter()

    def __call__(self, stats: dict) -> None:
        self.samples += stats["sample_count"]

    def end(self) -> None:
        seconds = time.perf_counter() - self.began
        log.info("%s: %d samples embedded in %.1f s (%.1f samples/s)", self.part, self.samples, seconds,
                 self.samples / seconds if seconds else 0.0)


def _run_local(raw: Path, shards: list[Shard], batch_size: int, workers: int, clip_model: str,
               text_model: str | None = None) -> None:
    """clip_inference's sequential path, built from clip-retrieval's own blocks (Runner,
    WebdatasetReader, ClipMapper, NumpyWriter) as its worker() does, but with the stats kept
    in-process and, on CPU, all_clip's warm-up (two forward passes of a full batch, there to
    settle CUDA kernels) at batch size 1. Same outputs, same layout. `text_model` (a folder,
    embed.text_model): its encoder embeds the captions, through ClipMapper's `use_mclip` path
    (a sentence-transformers model as clip-retrieval loads it, an M-CLIP model as its encoder)."""
    import torch
    from all_clip import load_clip
    from clip_retrieval.clip_inference.mapper import ClipMapper
    from clip_retrieval.clip_inference.reader import WebdatasetReader
    from clip_retrieval.clip_inference.runner import Runner
    from clip_retrieval.clip_inference.writer import NumpyWriter

    warmup = batch_size if torch.cuda.is_available() else 1
    # clip_inference hangs when a DataLoader worker gets no shard
    workers = max(1, min(workers, len(shards)))
    inputs = [webdataset_url(s.location) for s in shards]

    def reader(sampler):
        _, preprocess, tokenizer = load_clip(clip_model=clip_model, use_jit=False, warmup_batch_size=warmup,
                                         clip_cache_path=None)  # ClipMapper's call: one cached load
        return WebdatasetReader(sampler, preprocess, tokenizer, inputs, batch_size, workers, enable_text=True,
                                enable_image=True, enable_metadata=True)

    text_kind = text_encoders.kind(text_model) if text_model else None

    def mapper():
        mapped = ClipMapper(enable_image=True, enable_text=True, enable_metadata=True,
                            use_mclip=text_kind == "sentence_transformers", clip_model=clip_model, use_jit=False,
                            mclip_model=text_model, warmup_batch_size=warmup)
        if text_kind == "mclip":  # the same path with M-CLIP's encoder: captions -> embeddings, normalised
            mapped.use_mclip, mapped.model_txt = True, text_encoders.mclip_encoder(text_model)
        return mapped

    def writer(i):
        return NumpyWriter(partition_id=i, output_folder=str(raw), enable_text=True, enable_image=True,
                           enable_metadata=True, output_partition_count=1)

    Runner(reader_builder=reader, mapper_builder=mapper, writer_builder=writer,
           logger_builder=lambda i: _StatsLogger(raw.name), output_partition_count=1)(0)


def _embed(cfg, part: int, shards: list[Shard], downloaded: int, model, text_model: str | None = None) -> tuple:
    """One model (and `text_model`'s captions, if given) over the part's shards -> (img, text,
    metadata, dim), rows in key order."""
    if downloaded == 0:
        metadata = pd.DataFrame({c: pd.Series(dtype="object") for c in METADATA_COLUMNS})
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), metadata, None
    name = f"clip_inference.part_{part}.{uuid.uuid4().hex[:12]}"  # (a pid can repeat in containers)
    raw = TMP / name
    spark = cfg.engine.name == "spark"
    # on Spark, executors write their partitions where the driver can read them: engine.shared_tmp
    # (a URL or shared mount) on a cluster; absolute paths, as executors' workers do not run in
    # this process's directory
    output = join(cfg.engine.shared_tmp, name) if spark and cfg.engine.shared_tmp else str(raw.resolve())
    fs, root = filesystem(output)
    try:
        if spark:
            # clip-retrieval's own Spark path: one task (and output partition) per shard on the
            # session's executors, each loading the model; partitions are concatenated below
            from clip_retrieval.clip_inference.main import main as clip_inference

            from laionbuild.engine.spark import spark_session

            spark_session(cfg.engine)
            clip_inference(input_dataset=_brace_pattern(shards), output_folder=output,
                           input_format="webdataset",
                           enable_text=True, enable_image=True, enable_metadata=True,
                           batch_size=cfg.embed.batch_size, num_prepro_workers=1, clip_model=model.clip_model,
                           use_jit=False, output_partition_count=len(shards), distribution_strategy="pyspark",
                           **({"use_mclip": True, "mclip_model": text_model} if text_model else {}))
        else:
            _run_local(raw, shards, cfg.embed.batch_size, cfg.embed.num_prepro_workers, model.clip_model, text_model)

        def parts(kind: str, ext: str) -> list:
            found = by_number(fs.glob(f"{root.rstrip('/')}/{kind}/{kind}_*.{ext}"))
            if not found:  # (a partition of a shard without a readable image writes nothing)
                raise RuntimeError(f"{output}/{kind}: clip_inference wrote no output partition")
            return found

        def load(path: str):
            with fs.open(path, "rb") as f:
                data = io.BytesIO(f.read())
            return np.load(data) if path.endswith(".npy") else pd.read_parquet(data)

        img = np.concatenate([load(p) for p in parts("img_emb", "npy")])
        text = np.concatenate([load(p) for p in parts("text_emb", "npy")])
        metadata = pd.concat([load(p) for p in parts("metadata", "parquet")], ignore_index=True)
    finally:
        fs.invalidate_cache(root)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    # Build order is our key order (part, then source row). clip_inference's workers
    # interleave shards, and img2dataset writes a shard in completion order.
    order = np.argsort(metadata[KEY_COLUMN].astype(str).to_numpy(), kind="stable")
    img, text = img[order], text[order]
    metadata = metadata.iloc[order].reset_index(drop=True)
    metadata = metadata[[c for c in METADATA_COLUMNS if c in metadata.columns]]
    if text.shape[1] != img.shape[1]:  # (compose checks the widths the model files declare)
        raise RuntimeError(f"part {part}: embed.text_model {text_model} embedded captions in {text.shape[1]} dimensions, "
                           f"embed.model {model.architecture}'s images in {img.shape[1]}: the pair must share one "
                           "embedding space")
    return img, text, metadata, int(img.shape[1])


def _check_every_shard_read(shards: list[Shard], embedded: set[str]) -> None:
    """A shard with downloaded images of which none was embedded was not read at all (webdataset
    skips a shard it cannot open, e.g. a remote read that failed): an error, not a quiet loss."""
    for shard in shards:
        rows = pq.read_table(shard.parquet, columns=["status", KEY_COLUMN]).to_pydict()
        ok = [str(k) for k, status in zip(rows[KEY_COLUMN], rows["status"]) if status == "success"]
        if ok and not embedded.intersection(ok):
            raise RuntimeError(f"{shard.location}: none of its {len(ok)} images was embedded; the shard "
                               f"could not be read (see the warnings above); rerun the stage")


def run(cfg, part: int) -> None:
    if cfg.embed.from_source:
        return from_source(cfg, part)
    _select_device(cfg.embed.device)
    shards = part_shards(part_dir("download", part))
    downloaded = read_json(part_dir("download", part) / "stats.json")["counts"]["downloaded_ok"]
    model = resolve(cfg.embed)
    extra = {name: resolve(spec) for name, spec in cfg.embed.extra_models.items()}  # bad names fail first
    # (absolute: Spark's executors do not run in this directory)
    text_model = str(text_encoders.folder(cfg.embed.text_model).resolve()) if cfg.embed.text_model else None
    described = {**describe(model), **({"text_model": text_encoders.describe(text_model)} if text_model else {})}
    counts = Counts()
    with atomic_dir(part_dir("embed", part)) as out:
        img, text, metadata, dim = _embed(cfg, part, shards, downloaded, model, text_model)
        write_part(out, img, text, metadata)
        write_json(out / "model.json", {**described, "dim": dim})
        for name, other in extra.items():
            # the same shards again with another model (LAION-5B: ViT-B/32 to filter, ViT-L/14 to tag and index)
            o_img, o_text, o_meta, o_dim = _embed(cfg, part, shards, downloaded, other)
            if o_meta[KEY_COLUMN].astype(str).tolist() != metadata[KEY_COLUMN].astype(str).tolist():
                raise RuntimeError(f"part {part}: embed.extra_models.{name} embedded other samples than "
                                   f"embed.model ({len(o_meta)} vs {len(metadata)} rows)")
            target = out / "models" / name
            target.mkdir(parents=True)
            write_part(target, o_img, o_text, o_meta)
            write_json(target / "model.json", {**describe(other), "dim": o_dim, "name": name})
        _check_every_shard_read(shards, set(metadata[KEY_COLUMN].astype(str)))
        counts.set("embedded", len(metadata))
        counts.save(out)
    if len(metadata) != downloaded:
        log.warning("part %d: %d downloaded samples but %d embedded (unreadable images are skipped)",
                    part, downloaded, len(metadata))
