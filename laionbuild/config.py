"""The recipe schema: one dataclass per config group, mirrored by `conf/<group>/<option>.yaml`.

Hydra composes the YAML; this module types it. Every composed recipe and every `params.yaml`
a stage loads goes through `load_config`/`validate`, because DVC's own Hydra composition
(`dvc exp run -S ...`) writes `params.yaml` without our code in the loop.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException
# omegaconf itself is imported where it is used: a stage whose params.yaml was validated before
# loads it from the memo (load_params) without it

GROUPS = ("recipe", "source", "subset", "prepare", "dedup", "download", "embed", "tag", "select", "assemble", "index", "engine")


class RecipeError(ValueError):
    """A recipe that cannot be built. The message names the key (and file) at fault."""


@dataclass
class RecipeInfo:
    name: str = "unnamed"
    description: str = ""


@dataclass
class SourceConfig:
    name: str = "custom"
    # Any fsspec URL or a path relative to the project root.
    base_url: str = ""
    # File name of part N inside base_url, formatted with `part=N`.
    part_pattern: str = "part-{part:05d}.parquet"
    # Instead of part_pattern: a glob inside base_url; part N is the N-th matching file (sorted).
    files: Optional[str] = None
    num_parts: int = 1
    format: str = "parquet"  # parquet | csv | tsv | jsonl | auto (from each file's extension)
    # canonical column -> column in the source files (url and caption are required).
    columns: Dict[str, str] = field(default_factory=lambda: {"url": "url", "caption": "caption"})
    # canonical column -> other names it has in some files (tried in order when the
    # `columns` name is absent): raw crawl files name and order their columns differently.
    column_aliases: Dict[str, List[str]] = field(default_factory=dict)
    # Consolidate (as laion-prepro did): read every source file, shuffle rows with a seed and
    # write `consolidate_parts` parquet parts (canonical columns) that the build then uses as
    # its parts. None: use the source's own parts.
    consolidate_parts: Optional[int] = None
    consolidate_seed: int = 0
    # An id list picking the rows to keep (fsspec URL or path): `.pth` (torch-saved sequence
    # indexed by part number, entry i = ids kept from part i: LAION-Face's laion_face_ids.pth),
    # or a flat `.npy`, `.parquet` (column `ids_column`, or its only column) or `.txt` (one per line).
    ids_url: Optional[str] = None
    ids_column: str = "sample_id"  # the canonical column the ids match
    # fetch: transient errors (5xx, 429, timeouts, dropped connections) are retried with backoff
    fetch_retries: int = 5
    fetch_backoff_s: float = 1.0
    # Precomputed image embeddings published next to the metadata (LAION2B-en's
    # img_emb/img_emb_NNNN.npy: row i embeds metadata row i): file name of part N's .npy inside
    # base_url, formatted with `part=N`. fetch fetches it with the metadata; `embed.from_source`
    # uses it instead of running a model. None: the source has none.
    image_embeddings: Optional[str] = None
    # The model that made them (recorded in model.json and the dataset card), e.g. ViT-L-14/openai.
    image_embeddings_model: Optional[str] = None


@dataclass
class SubsetConfig:
    name: str = "all"
    parts: List[int] = field(default_factory=lambda: [0])


@dataclass
class NsfwPolicy:
    # Rows whose NSFW tag is one of these values are dropped (LAION's tags: UNLIKELY, UNSURE, NSFW).
    drop: List[str] = field(default_factory=lambda: ["NSFW"])
    # Drop rows whose tag is missing too (the LAION2B SISAP rule: keep tag present and not NSFW).
    drop_missing: bool = False


@dataclass
class PrepareConfig:
    """Per-part metadata filters, applied in this order (after source.ids_url); each is counted."""

    nsfw: NsfwPolicy = field(default_factory=NsfwPolicy)
    min_similarity: Optional[float] = None  # source `similarity` column (LAION-400M: 0.3, 2B-en: 0.28)
    min_caption_chars: Optional[int] = None
    max_caption_chars: Optional[int] = None
    min_caption_words: Optional[int] = None
    max_caption_words: Optional[int] = None
    min_width: Optional[int] = None  # source width/height columns (the image is not fetched yet)
    min_height: Optional[int] = None
    max_aspect_ratio: Optional[float] = None  # max(w, h) / min(w, h)
    # Keep captions detected (offline, langid.py) as one of these ISO 639-1 codes, e.g. [en];
    # adds a `language` column. None: no language filter.
    languages: Optional[List[str]] = None
    min_language_score: float = 0.0  # normalised probability of the detected language


@dataclass
class DedupConfig:
    """Dedup across all parts of the build: the first occurrence in part order wins."""

    # Equal values in these canonical columns make rows duplicates. [] turns dedup off.
    keys: List[str] = field(default_factory=lambda: ["url", "caption"])
    # Keep the captions of merged rows in a list column `captions` (MS-COCO: 5 rows per image).
    merge_captions: bool = False
    # DuckDB memory cap for the global dedup; beyond it DuckDB spills to data/.tmp.
    memory_limit: str = "4GB"
    # local engine: rows are hash-partitioned on the dedup keys into buckets of about this many
    # rows, each deduplicated on its own, so time and memory grow linearly with the build
    bucket_rows: int = 5_000_000


@dataclass
class LocalServerConfig:
    # URLs on this host are served from `root` on 127.0.0.1 while the download stage runs.
    host: Optional[str] = None
    root: Optional[str] = None


@dataclass
class DownloadConfig:
    # False: no images (an embeddings-only build from source.image_embeddings, e.g. SISAP LAION2B)
    enabled: bool = True
    image_size: int = 256
    resize_mode: str = "border"  # no | border | keep_ratio | keep_ratio_largest | center_crop
    encode_format: str = "jpg"
    encode_quality: int = 95
    number_sample_per_shard: int = 10000
    processes_count: int = 2
    thread_count: int = 32
    timeout: int = 10
    retries: int = 0
    min_image_size: int = 0
    max_aspect_ratio: Optional[float] = None  # None: no limit
    compute_hash: Optional[str] = "sha256"
    max_image_area: Optional[float] = None  # pixels; larger images fail as "image area too large"
    # X-Robots-Tag directives that opt an image out (honoured by default, as img2dataset does)
    disallowed_header_directives: List[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    user_agent_token: Optional[str] = None  # e.g. laionbuild: matched in X-Robots-Tag "token: ..." rules
    # Politeness (in each worker's urllib, laionbuild/policy_opener.py): concurrent requests per
    # host across all download processes of a machine (None: no cap), and the first back-off
    # delay after a 429 (doubling)
    max_per_host: Optional[int] = 4
    backoff_seconds: float = 1.0
    # Re-attempt transient failures (timeouts, connection errors, 429, 5xx) this many times at
    # the end of the stage, `retry_delay` seconds apart (`laionbuild retry-failed` does it later)
    retry_rounds: int = 0
    retry_delay: float = 5.0
    # Refuse URLs whose host is/resolves to an address that is not globally routable (loopback,
    # private, CGNAT, link-local, multicast, reserved...; checked again at every redirect and
    # connection). Schemes other than http(s) are refused whatever this says.
    allow_private_urls: bool = False
    private_host_allowlist: List[str] = field(default_factory=list)  # hosts exempt (e.g. an internal mirror)
    local_server: LocalServerConfig = field(default_factory=LocalServerConfig)
    # Where img2dataset writes the shards: None = in the workspace (data/images, DVC-cached); an
    # fsspec URL (s3://bucket/prefix, gs://…, hdfs://…, file:///mnt/shared/…) = there, one
    # prefix per distinct stage input, data/images/part_N keeping a manifest (laionbuild/storage.py)
    shards_url: Optional[str] = None


@dataclass
class ModelSpec:
    """One more model embedded per part (embed.extra_models.NAME)."""

    model: str = "ViT-L-14"  # any open_clip architecture
    pretrained: str = "openai"  # an open_clip pretrained tag, a local checkpoint path, or `random`
    seed: int = 0  # used by `random` only


@dataclass
class EmbedConfig:
    model: str = "ViT-B-32"  # any open_clip architecture
    # An open_clip pretrained tag (e.g. laion2b_s34b_b79k), a local checkpoint path, or
    # `random` (seeded untrained weights: offline, and labelled untrained in every output).
    pretrained: str = "laion2b_s34b_b79k"
    seed: int = 0
    batch_size: int = 64
    num_prepro_workers: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Take the source's precomputed image embeddings (source.image_embeddings) for the part's
    # rows instead of running the model: no images needed, no text embeddings.
    from_source: bool = False
    # More models embedded per part besides embed.model, by name (LAION-5B: ViT-B/32 for the CLIP
    # similarity filter, ViT-L/14 for the NSFW/watermark heads and the index). Their embeddings go
    # to data/embed/part_N/models/NAME/; tag.clip_similarity_model, tag.heads.X.model,
    # tag.near_dup.model, index.model and export.model name the one they use (null: embed.model).
    extra_models: Dict[str, ModelSpec] = field(default_factory=dict)


@dataclass
class FacesConfig:
    # none (no face tags) | auto (retinaface when its weights file exists, else opencv_haar) |
    # opencv_haar (cascades shipped in OpenCV, offline) | retinaface (the retina-face package)
    detector: str = "none"
    weights: Optional[str] = None  # retinaface weights file; None: $DEEPFACE_HOME/.deepface/weights/retinaface.pth
    min_score: float = 0.5  # faces below this score are not reported
    processes: int = 2  # shards of a part are tagged in parallel, one process per shard
    # retinaface: upscale each image so its shorter side is 1024 px (the package's default; finds
    # small faces in thumbnails, ~20x slower on CPU)
    upscale: bool = False


@dataclass
class HeadConfig:
    kind: str = "linear"  # linear | mlp | improved_aesthetic (laionbuild/heads.py documents each format)
    path: str = ""  # weights file (.pth state dict or .npz); missing: the tag is skipped with a warning
    sigmoid: Optional[bool] = None  # None: the format's default
    activation: Optional[str] = None  # mlp: between layers (relu | none); None: the format's default
    model: Optional[str] = None  # the embed.extra_models entry whose image embeddings it scores; None: embed.model


@dataclass
class NearDupConfig:
    enabled: bool = False
    index: str = "Flat"  # faiss index_factory string; Flat is exact (quadratic), HNSW32 scales
    model: Optional[str] = None  # embed.extra_models entry whose image embeddings it compares; None: embed.model


@dataclass
class TagConfig:
    # Which tags the tag stage computes. clip_similarity and the image sizes are always there.
    clip_similarity: bool = True
    clip_similarity_model: Optional[str] = None  # embed.extra_models entry; None: embed.model
    faces: FacesConfig = field(default_factory=FacesConfig)
    # Score heads on the image embeddings: tag column name -> head (e.g. aesthetic_score, nsfw_score).
    heads: Dict[str, HeadConfig] = field(default_factory=dict)
    # Near-duplicate tag over all parts (the global neardup stage).
    near_dup: NearDupConfig = field(default_factory=NearDupConfig)


@dataclass
class SelectConfig:
    # Keep samples whose CLIP image-text cosine is >= this (None: no CLIP rule).
    min_clip_similarity: Optional[float] = None
    # Face rules (need tag.faces.detector): at least this many faces / a face scoring at least this.
    min_faces: Optional[int] = None
    min_face_score: Optional[float] = None
    # Semantic dedup (needs tag.near_dup.enabled): keep samples whose image embedding's cosine to
    # every earlier sample is below this.
    max_near_dup_similarity: Optional[float] = None
    # Score-head tags (tag.heads): keep samples whose score is >= / <= these, per tag column.
    min_scores: Dict[str, float] = field(default_factory=dict)
    max_scores: Dict[str, float] = field(default_factory=dict)


@dataclass
class AssembleConfig:
    samples_per_shard: int = 10000
    embeddings_per_file: int = 1_000_000


@dataclass
class ExportConfig:
    """Extra export formats of the selected samples (data/export/), streamed part by part."""

    # h5: data/export/emb.h5, dataset `emb` (N x dim) of the image embeddings in dataset order
    h5: bool = False
    h5_dtype: str = "float16"  # float16 | float32
    model: Optional[str] = None  # whose image embeddings: an embed.extra_models entry; None: embed.model
    # tsv: data/export/metadata.tsv with these columns, same row order: output name -> column of
    # the prepared metadata (e.g. {caption: caption, NSFW: nsfw}). {}: no TSV. Fields holding tabs,
    # newlines or quotes are quoted (RFC 4180 style, read back by csv/pandas with sep=tab).
    tsv_columns: Dict[str, str] = field(default_factory=dict)


@dataclass
class IndexConfig:
    model: Optional[str] = None  # whose image embeddings to index: an embed.extra_models entry; None: embed.model
    index_key: Optional[str] = None  # None: autofaiss picks one
    metric_type: str = "ip"
    max_index_memory_usage: str = "4G"
    current_memory_available: str = "8G"
    max_index_query_time_ms: float = 10.0
    nb_cores: Optional[int] = None
    # the index report (data/metrics/index.json): this many sampled text-embedding queries
    report_queries: int = 1000
    report_seed: int = 0


@dataclass
class EngineConfig:
    name: str = "local"  # local (DuckDB in-process) | spark
    # spark only: local[N], spark://host:port, yarn, or `active` (the session of this process)
    master: str = "local[2]"
    driver_memory: str = "4g"
    shuffle_partitions: int = 8
    conf: Dict[str, str] = field(default_factory=dict)  # extra spark.* settings
    # spark only: a folder every executor can write and the driver read (a shared mount, hdfs://,
    # s3://...) for intermediate files (autofaiss's per-task indices); None: data/.tmp (local[N])
    shared_tmp: Optional[str] = None
    # local only: DuckDB threads while writing ordered parquet (prepare, dedup). Order is kept by
    # buffering row groups per thread: on 2 cores 1 thread is as fast and halves peak memory;
    # raise it on many cores for speed
    write_threads: int = 1



@dataclass
class Config:
    recipe: RecipeInfo = field(default_factory=RecipeInfo)
    source: SourceConfig = field(default_factory=SourceConfig)
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tag: TagConfig = field(default_factory=TagConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
SOURCE_FORMATS = ("parquet", "csv", "tsv", "jsonl", "auto")
ENCODE_FORMATS = ("jpg", "png", "webp")
CANONICAL_REQUIRED = ("url", "caption")
CANONICAL_COLUMNS = ("url", "caption", "sample_id", "width", "height", "license", "nsfw", "similarity")


def _check(condition: bool, key: str, message: str, where: str) -> None:
    if not condition:
        raise RecipeError(f"{where}: invalid value for `{key}`: {message}")


FACE_DETECTORS = ("none", "auto", "opencv_haar", "retinaface")
HEAD_KINDS = ("linear", "mlp", "improved_aesthetic")


def validate(cfg: Config | DictConfig, where: str = "recipe") -> None:
    """Range and cross-field checks that types alone cannot express."""
    c = cfg
    _check(bool(c.source.base_url), "source.base_url", "must be set (a path or fsspec URL)", where)
    _check(c.source.num_parts >= 1, "source.num_parts", f"must be >= 1, got {c.source.num_parts}", where)
    _check(c.source.format in SOURCE_FORMATS, "source.format", f"must be one of {SOURCE_FORMATS}", where)
    try:
        c.source.part_pattern.format(part=0)
    except (KeyError, IndexError, ValueError) as exc:
        raise RecipeError(f"{where}: invalid value for `source.part_pattern`: {exc!r}; use {{part}}") from None
    for canonical in CANONICAL_REQUIRED:
        _check(canonical in c.source.columns, f"source.columns.{canonical}", "is required", where)
    for canonical in c.source.columns:
        _check(canonical in CANONICAL_COLUMNS, f"source.columns.{canonical}",
               f"unknown canonical column; known: {CANONICAL_COLUMNS}", where)

    _check(c.source.fetch_retries >= 0, "source.fetch_retries", "must be >= 0", where)
    _check(c.source.fetch_backoff_s >= 0, "source.fetch_backoff_s", "must be >= 0", where)
    _check(c.source.consolidate_parts is None or c.source.consolidate_parts >= 1, "source.consolidate_parts",
           "must be >= 1", where)
    for canonical in c.source.column_aliases:
        _check(canonical in c.source.columns, f"source.column_aliases.{canonical}",
               "aliases need the canonical column in source.columns too", where)
    available = c.source.consolidate_parts or c.source.num_parts
    parts = list(c.subset.parts)
    _check(len(parts) > 0, "subset.parts", "must not be empty", where)
    _check(len(set(parts)) == len(parts), "subset.parts", f"has repeated part ids: {parts}", where)
    for part in parts:
        _check(0 <= part < available, "subset.parts",
               f"part {part} does not exist in source `{c.source.name}` (parts 0..{available - 1})", where)

    p = c.prepare
    _check(p.min_similarity is None or -1 <= p.min_similarity <= 1, "prepare.min_similarity",
           f"a cosine similarity must be in [-1, 1], got {p.min_similarity}", where)
    for key in ("min_caption_chars", "max_caption_chars", "min_caption_words", "max_caption_words", "min_width",
                "min_height"):
        value = getattr(p, key)
        _check(value is None or value >= 0, f"prepare.{key}", f"must be >= 0, got {value}", where)
    _check(p.max_aspect_ratio is None or p.max_aspect_ratio >= 1, "prepare.max_aspect_ratio", "must be >= 1", where)
    _check(p.languages is None or len(p.languages) > 0, "prepare.languages", "use null for no filter, not []", where)
    _check(0 <= p.min_language_score <= 1, "prepare.min_language_score", "must be in [0, 1]", where)
    for low, high in (("min_caption_chars", "max_caption_chars"), ("min_caption_words", "max_caption_words")):
        lo, hi = getattr(p, low), getattr(p, high)
        _check(lo is None or hi is None or lo <= hi, f"prepare.{low}", f"must be <= prepare.{high}", where)
    needs = {"min_similarity": "similarity", "min_width": "width", "min_height": "height",
             "max_aspect_ratio": "width"}
    for key, column in needs.items():
        _check(getattr(p, key) is None or column in c.source.columns, f"prepare.{key}",
               f"needs the source column `{column}` (source.columns.{column} is not mapped)", where)
    _check(c.source.ids_url is None or c.source.ids_column in c.source.columns, "source.ids_column",
           f"the id list matches `{c.source.ids_column}`, which source.columns does not map", where)

    for key in c.dedup.keys:
        _check(key in CANONICAL_COLUMNS, "dedup.keys", f"`{key}` is not a canonical column", where)
        _check(key in c.source.columns, "dedup.keys", f"`{key}` is not mapped by source.columns", where)
    _check(not c.dedup.merge_captions or "caption" not in c.dedup.keys, "dedup.merge_captions",
           "merging captions needs dedup.keys without caption (e.g. [url])", where)

    d = c.download
    _check(d.resize_mode in RESIZE_MODES, "download.resize_mode", f"must be one of {RESIZE_MODES}", where)
    _check(d.encode_format in ENCODE_FORMATS, "download.encode_format", f"must be one of {ENCODE_FORMATS}", where)
    _check(d.image_size > 0, "download.image_size", f"must be > 0, got {d.image_size}", where)
    _check(0 <= d.encode_quality <= 100, "download.encode_quality", "must be in [0, 100]", where)
    _check(d.number_sample_per_shard > 0, "download.number_sample_per_shard", "must be > 0", where)
    _check(d.processes_count > 0, "download.processes_count", "must be > 0", where)
    _check(d.thread_count > 0, "download.thread_count", "must be > 0", where)
    _check(d.timeout > 0, "download.timeout", "must be > 0", where)
    _check(d.retries >= 0, "download.retries", "must be >= 0", where)
    _check(d.min_image_size >= 0, "download.min_image_size", f"must be >= 0, got {d.min_image_size}", where)
    _check(d.max_aspect_ratio is None or d.max_aspect_ratio >= 1, "download.max_aspect_ratio", "must be >= 1", where)
    _check(d.max_image_area is None or d.max_image_area > 0, "download.max_image_area", "must be > 0", where)
    _check(d.max_per_host is None or d.max_per_host >= 1, "download.max_per_host", "must be >= 1 or null", where)
    _check(d.backoff_seconds >= 0, "download.backoff_seconds", "must be >= 0", where)
    _check(d.retry_rounds >= 0, "download.retry_rounds", "must be >= 0", where)
    _check(d.retry_delay >= 0, "download.retry_delay", "must be >= 0", where)
    _check((d.local_server.host is None) == (d.local_server.root is None), "download.local_server",
           "set both host and root, or neither", where)
    if d.shards_url is not None:
        _check(("://" in d.shards_url and not d.shards_url.startswith("file://")) or
               d.shards_url.removeprefix("file://").startswith("/"), "download.shards_url",
               f"an fsspec URL (s3://bucket/prefix, file:///mnt/shared/x) or an absolute path, got "
               f"{d.shards_url!r} (executors resolve relative paths in their own directory)", where)
        try:
            import fsspec

            fsspec.get_filesystem_class(d.shards_url.split("://", 1)[0] if "://" in d.shards_url else "file")
        except (ImportError, ValueError) as exc:
            raise RecipeError(f"{where}: invalid value for `download.shards_url`: {exc}") from None

    e = c.embed
    _check(not e.from_source or bool(c.source.image_embeddings), "embed.from_source",
           "needs source.image_embeddings (the source's precomputed embedding files)", where)
    _check(d.enabled or e.from_source, "download.enabled",
           "without images there is nothing to embed: set embed.from_source=true (with source.image_embeddings)",
           where)
    _check(d.enabled or c.tag.faces.detector == "none", "download.enabled",
           "face tags need images: set tag.faces.detector=none", where)
    _check(not e.from_source or c.select.min_clip_similarity is None, "select.min_clip_similarity",
           "needs text embeddings, which embed.from_source does not have (use prepare.min_similarity, "
           "the source's own similarity column)", where)
    for name, spec in e.extra_models.items():
        _check(name.isidentifier(), f"embed.extra_models.{name}", "names must be identifiers (a-z, 0-9, _)", where)
        _check(bool(spec.model) and bool(spec.pretrained), f"embed.extra_models.{name}",
               "needs model and pretrained", where)
    _check(not (e.from_source and e.extra_models), "embed.extra_models",
           "models need images, which embed.from_source builds do not have", where)
    users = {"tag.clip_similarity_model": c.tag.clip_similarity_model, "tag.near_dup.model": c.tag.near_dup.model,
             "index.model": c.index.model, "export.model": c.export.model,
             **{f"tag.heads.{n}.model": h.model for n, h in c.tag.heads.items()}}
    for key, name in users.items():
        _check(name is None or name in e.extra_models, key,
               f"`{name}` is not in embed.extra_models ({sorted(e.extra_models)}); null means embed.model", where)
    _check(c.export.h5_dtype in ("float16", "float32"), "export.h5_dtype", "must be float16 or float32", where)
    _check(not (c.source.image_embeddings and c.source.consolidate_parts), "source.image_embeddings",
           "cannot follow consolidated (shuffled) parts: set source.consolidate_parts=null", where)
    if c.source.image_embeddings:
        try:
            c.source.image_embeddings.format(part=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise RecipeError(f"{where}: invalid value for `source.image_embeddings`: {exc!r}; use {{part}}") from None
    _check(bool(e.model), "embed.model", "must name an open_clip architecture", where)
    _check(bool(e.pretrained), "embed.pretrained", "must be a pretrained tag, a checkpoint path or `random`", where)
    _check(e.batch_size > 0, "embed.batch_size", "must be > 0", where)
    _check(e.num_prepro_workers >= 0, "embed.num_prepro_workers", "must be >= 0", where)
    _check(e.device == "auto" or e.device == "cpu" or e.device.startswith("cuda"), "embed.device",
           "must be auto, cpu, cuda or cuda:N", where)

    threshold = c.select.min_clip_similarity
    _check(threshold is None or (-1.0 <= threshold <= 1.0 and not math.isnan(threshold)),
           "select.min_clip_similarity", f"a cosine similarity must be in [-1, 1], got {threshold}", where)

    _check(c.assemble.samples_per_shard > 0, "assemble.samples_per_shard", "must be > 0", where)
    _check(c.assemble.embeddings_per_file > 0, "assemble.embeddings_per_file", "must be > 0", where)
    _check(c.index.metric_type in ("ip", "l2"), "index.metric_type", "must be ip or l2", where)
    _check(c.index.nb_cores is None or c.index.nb_cores > 0, "index.nb_cores", "must be > 0", where)
    _check(c.index.max_index_query_time_ms > 0, "index.max_index_query_time_ms", "must be > 0", where)
    _check(c.engine.name in ("local", "spark"), "engine.name", "must be local or spark", where)
    f = c.tag.faces
    _check(f.detector in FACE_DETECTORS, "tag.faces.detector", f"must be one of {FACE_DETECTORS}", where)
    _check(0 <= f.min_score <= 1, "tag.faces.min_score", f"must be in [0, 1], got {f.min_score}", where)
    _check(f.processes >= 1, "tag.faces.processes", "must be >= 1", where)
    for key in ("min_faces", "min_face_score"):
        _check(getattr(c.select, key) is None or f.detector != "none", f"select.{key}",
               "needs face tags: set tag.faces.detector (auto, opencv_haar or retinaface)", where)
    _check(c.select.min_faces is None or c.select.min_faces >= 0, "select.min_faces", "must be >= 0", where)
    _check(c.select.min_face_score is None or 0 <= c.select.min_face_score <= 1, "select.min_face_score",
           "must be in [0, 1]", where)
    _check(c.select.max_near_dup_similarity is None or c.tag.near_dup.enabled, "select.max_near_dup_similarity",
           "needs tag.near_dup.enabled=true", where)
    for name, head in c.tag.heads.items():
        _check(head.kind in HEAD_KINDS, f"tag.heads.{name}.kind", f"must be one of {HEAD_KINDS}", where)
        _check(bool(head.path), f"tag.heads.{name}.path", "must be set", where)
    for bound in ("min_scores", "max_scores"):
        for name in getattr(c.select, bound):
            _check(name in c.tag.heads, f"select.{bound}.{name}", f"is not a score head of tag.heads "
                   f"({sorted(c.tag.heads)})", where)
    _check(c.index.report_queries >= 0, "index.report_queries", "must be >= 0", where)
    _check(c.dedup.bucket_rows >= 1, "dedup.bucket_rows", f"must be >= 1, got {c.dedup.bucket_rows}", where)
    _check(c.engine.shuffle_partitions > 0, "engine.shuffle_partitions", "must be > 0", where)
    _check(c.engine.write_threads >= 1, "engine.write_threads", f"must be >= 1, got {c.engine.write_threads}", where)


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    reason = str(exc).splitlines()[0]
    return f"invalid key `{key}`: {reason}" if key else reason


def to_config(raw: Dict[str, Any] | DictConfig, where: str = "recipe") -> Config:
    """Type-check `raw` against the schema (unknown keys, wrong types) then range-check it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        schema = OmegaConf.structured(Config)
        merged = OmegaConf.merge(schema, raw)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise RecipeError(f"{where}: {_omegaconf_message(exc)}") from None
    validate(cfg, where)
    return cfg


def load_params(path: str | Path = "params.yaml") -> Config:
    """Load and validate the composed recipe a DVC stage runs with. A project's params.yaml,
    once validated, is remembered (pickled under data/.work/params/, by the hash of its bytes
    and of this schema's source): the next stage process of the build loads it in milliseconds
    instead of a quarter of a second of OmegaConf."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: not found; run `laionbuild compose` first")
    memo = _params_memo(path)
    if memo is not None and memo.exists():
        try:
            cfg = pickle.loads(memo.read_bytes())
            if isinstance(cfg, Config):
                return cfg
        except Exception:  # a memo from another version, or damaged: validate again
            pass
    cfg = _load_and_validate(path)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps(cfg))
        os.replace(tmp, memo)
    return cfg


def _params_memo(path: Path) -> Path | None:
    """Where a project's validated params.yaml is remembered (None for a file elsewhere)."""
    if path.name != "params.yaml" or not (path.parent / "dvc.yaml").exists():
        return None
    digest = hashlib.sha256(path.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return path.parent / "data" / ".work" / "params" / f"{digest.hexdigest()[:32]}.pickle"


def _load_and_validate(path: Path) -> Config:
    from omegaconf import DictConfig, OmegaConf

    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in many types
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, DictConfig):
        raise RecipeError(f"{path}: expected a mapping of config groups at the top level")
    # DVC's Hydra composition may leave Hydra's own keys out but never adds others.
    return to_config(raw, where=str(path))


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def compose(overrides: List[str], conf_dir: str | Path = "conf", config_name: str = "config") -> Config:
    """Compose `conf/config.yaml` with Hydra override grammar, then validate."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = Path(conf_dir).resolve()
    if not (conf_dir / f"{config_name}.yaml").exists():
        raise RecipeError(f"{conf_dir / (config_name + '.yaml')}: not found")
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            raw = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise RecipeError(f"composing {conf_dir}: {str(exc).splitlines()[0]}") from None
    return to_config(raw, where=f"recipe composed from {conf_dir.name}/ with overrides {list(overrides)}")
