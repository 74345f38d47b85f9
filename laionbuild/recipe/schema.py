"""The recipe schema: one dataclass per config group, mirrored by `conf/<group>/<option>.yaml`.

Hydra composes the YAML; this module types it. Every composed recipe and every `params.yaml`
a stage loads goes through `to_config`/`load_params` (validated), because DVC's own Hydra composition
(`dvc exp run -S ...`) writes `params.yaml` without our code in the loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import re
import typing
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Dict, Iterator, List, Literal, Optional, Tuple

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from laionbuild.project.atomic import atomic_write_bytes
from laionbuild.recipe.errors import RecipeError
from laionbuild.recipe.provenance import Origin, composed_origin, defaults_files
from laionbuild.recipe.validate import FREE_FORM, fields_at, unknown_key_hint, validate
from laionbuild.recipe.values import (
    ActivationName,
    CanonicalColumn,
    DuckdbMemory,
    FaceDetectorName,
    FaissMemory,
    HashName,
    HeadKind,
    SparkMemory,
)

if TYPE_CHECKING:
    from omegaconf import DictConfig
# omegaconf itself is imported where it is used: a stage whose params.yaml was validated before
# loads it from the memo (load_params) without it

# Pydantic dataclasses (not OmegaConf structured configs): the stages keep plain dataclasses
# (attributes, dataclasses.replace, pickling), while the types carry ranges and Literal value sets
# OmegaConf cannot express, unknown keys are refused (extra="forbid") and every error has a key path.
dataclass = _pydantic_dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True,
                                                 defer_build=True))

# A (key under the section, the bad value, what is wrong and what would be accepted)
Problem = Tuple[str, Any, str]

NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
NonNegFloat = Annotated[float, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Cosine = Annotated[float, Field(ge=-1, le=1)]
Probability = Annotated[float, Field(ge=0, le=1)]
AspectRatio = Annotated[float, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0, le=1)]

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]
SourceFormat = Literal["parquet", "csv", "tsv", "jsonl", "auto"]
EncodeFormat = Literal["jpg", "png", "webp"]
CANONICAL_REQUIRED = ("url", "caption")


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
    num_parts: PosInt = 1
    format: SourceFormat = "parquet"  # auto: from each file's extension
    # canonical column -> column in the source files (url and caption are required).
    columns: Dict[CanonicalColumn, str] = field(default_factory=lambda: {"url": "url", "caption": "caption"})
    # canonical column -> other names it has in some files (tried in order when the
    # `columns` name is absent): raw crawl files name and order their columns differently.
    column_aliases: Dict[CanonicalColumn, List[str]] = field(default_factory=dict)
    # Consolidate (as laion-prepro did): read every source file, shuffle rows with a seed and
    # write `consolidate_parts` parquet parts (canonical columns) that the build then uses as
    # its parts. None: use the source's own parts.
    consolidate_parts: Optional[PosInt] = None
    consolidate_seed: int = 0
    # An id list picking the rows to keep (fsspec URL or path): `.pth` (torch-saved sequence
    # indexed by part number, entry i = ids kept from part i: LAION-Face's laion_face_ids.pth),
    # or a flat `.npy`, `.parquet` (column `ids_column`, or its only column) or `.txt` (one per line).
    ids_url: Optional[str] = None
    ids_column: CanonicalColumn = "sample_id"  # the canonical column the ids match
    # fetch: transient errors (5xx, 429, timeouts, dropped connections) are retried with backoff
    fetch_retries: NonNegInt = 5
    fetch_backoff_s: NonNegFloat = 1.0
    # Precomputed image embeddings published next to the metadata (LAION2B-en's
    # img_emb/img_emb_NNNN.npy: row i embeds metadata row i): file name of part N's .npy (or .npz:
    # embed.from_source_array names the array) inside base_url, formatted with `part=N` and
    # `stem` = the part file's path inside base_url without its extension (DataComp: {stem}.npz).
    # fetch fetches it with the metadata; `embed.from_source` uses it instead of running a
    # model. None: the source has none.
    image_embeddings: Optional[str] = None
    # The model that made them (recorded in model.json and the dataset card), e.g. ViT-L-14/openai.
    image_embeddings_model: Optional[str] = None

    def problems(self) -> Iterator[Problem]:
        if not self.base_url:
            yield "base_url", self.base_url, "must be set (a path or fsspec URL)"
        if not _formats_with_part(self.part_pattern):
            yield ("part_pattern", self.part_pattern,
                   "must be a file name with one {part} placeholder, e.g. part-{part:05d}.parquet")
        if self.image_embeddings and not _formats_with_part(self.image_embeddings, stem="x"):
            yield ("image_embeddings", self.image_embeddings, "must be a file name with {part} or {stem} placeholders "
                   "(the part file's name without extension), e.g. img_emb_{part:04d}.npy or {stem}.npz")
        if self.files is None and self.num_parts > 1 and "{part" not in self.part_pattern:
            yield ("part_pattern", self.part_pattern, f"names the same file for all {self.num_parts} parts: "
                   "add {part} (e.g. part-{part:05d}.parquet) or use source.files (a glob)")
        for canonical in CANONICAL_REQUIRED:
            if canonical not in self.columns:
                yield f"columns.{canonical}", None, "is required (the column of the source files holding it)"
        for canonical in self.column_aliases:
            if canonical not in self.columns:
                yield f"column_aliases.{canonical}", self.column_aliases[canonical], \
                    "aliases need the canonical column in source.columns too"
        if self.ids_url is not None and self.ids_column not in self.columns:
            yield "ids_column", self.ids_column, "the id list matches this column, which source.columns does not map"
        if self.image_embeddings and self.consolidate_parts:
            yield ("image_embeddings", self.image_embeddings,
                   "cannot follow consolidated (shuffled) parts: set source.consolidate_parts=null")


@dataclass
class SubsetConfig:
    name: str = "all"
    parts: List[NonNegInt] = field(default_factory=lambda: [0])

    def problems(self) -> Iterator[Problem]:
        if not self.parts:
            yield "parts", self.parts, "must not be empty (list the part ids to build, e.g. [0, 1])"
        if len(set(self.parts)) != len(self.parts):
            yield "parts", self.parts, "has repeated part ids"


@dataclass
class NsfwPolicy:
    # Rows whose NSFW tag is one of these values are dropped (LAION's tags: UNLIKELY, UNSURE, NSFW).
    drop: List[str] = field(default_factory=lambda: ["NSFW"])
    # Drop rows whose tag is missing too (the LAION2B SISAP rule: keep tag present and not NSFW).
    drop_missing: bool = False


# image_md5 / image_sha256 are refused here, pointing at select.image_blocklists (matched after the download)
BlocklistMatch = Literal["url_md5", "url_sha256", "sample_id", "image_md5", "image_sha256"]
# the hash of the image's bytes as fetched, img2dataset's download.compute_hash column (image_sha1:
# refused at compose, img2dataset 1.47 computes md5, sha256 and sha512 only)
ImageBlocklistMatch = Literal["image_md5", "image_sha1", "image_sha256", "image_sha512"]
ListName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
UNSET = ("", "???")  # a required path a recipe leaves to the user (`???`: Hydra's missing value)


@dataclass
class BlocklistEntry:
    """One hash list of prepare.blocklists (laionbuild/metadata/blocklists.py, docs/safety.md)."""

    name: ListName = "blocklist"  # the funnel step is `blocklist_<name>`
    # a local path (relative to the project) or any fsspec URL: .txt (one entry a line), .csv
    # (header row), .parquet; .txt/.csv may be gzip'd (.gz)
    path: str = ""
    # url_md5 / url_sha256: hex digest of the source row's exact URL string (UTF-8 bytes, not
    # normalised), any case; sample_id: the source's id column (source.columns.sample_id);
    # image_md5 / image_sha256: refused, they belong in select.image_blocklists
    match: BlocklistMatch = "url_md5"
    column: Optional[str] = None  # .csv/.parquet: the column holding the entries; None: the only column

    def problems(self) -> Iterator[Problem]:
        if self.match.startswith("image_"):
            yield ("match", self.match, "an image-hash list is matched after the download, against img2dataset's "
                   "download.compute_hash: move it to select.image_blocklists (docs/safety.md)")
        if self.path in UNSET:
            yield ("path", self.path, f"the `{self.name}` hash list must be given: its local path or fsspec URL, e.g. "
                   f"prepare.blocklists.{{i}}.path=/lists/{self.name}.txt (docs/safety.md)")


@dataclass
class ImageBlocklistEntry:
    """One hash list of select.image_blocklists, matched by the `screen` stage against the hashes
    img2dataset computed of the downloaded images (laionbuild/metadata/blocklists.py, docs/safety.md)."""

    name: ListName = "blocklist"  # the funnel step is `image_blocklist_<name>`
    # a local path (relative to the project) or any fsspec URL: .txt (one entry a line), .csv
    # (header row), .parquet; .txt/.csv may be gzip'd (.gz)
    path: str = ""
    # the hex digest of the image's bytes as fetched (before any resize), any case; needs
    # download.compute_hash to be that algorithm (image_md5: md5, ...)
    match: ImageBlocklistMatch = "image_md5"
    column: Optional[str] = None  # .csv/.parquet: the column holding the entries; None: the only column

    def problems(self) -> Iterator[Problem]:
        if self.path in UNSET:
            yield ("path", self.path, f"the `{self.name}` hash list must be given: its local path or fsspec URL, e.g. "
                   f"select.image_blocklists.{{i}}.path=/lists/{self.name}.txt (docs/safety.md)")


def list_problems(entries, key: str) -> Iterator[Problem]:
    """Each entry's own problems and repeated names, keys `KEY.i.field`."""
    names = [entry.name for entry in entries]
    for i, entry in enumerate(entries):
        for field_name, value, message in entry.problems():
            yield f"{key}.{i}.{field_name}", value, message.replace("{i}", str(i))
        if names.index(entry.name) != i:
            yield f"{key}.{i}.name", entry.name, "is the name of an earlier list: give each list its own name"


@dataclass
class PrepareConfig:
    """Per-part metadata filters, applied in this order (after source.ids_url); each is counted."""

    nsfw: NsfwPolicy = field(default_factory=NsfwPolicy)
    min_similarity: Optional[Cosine] = None  # source `similarity` column (LAION-400M: 0.3, 2B-en: 0.28)
    min_caption_chars: Optional[NonNegInt] = None
    max_caption_chars: Optional[NonNegInt] = None
    min_caption_words: Optional[NonNegInt] = None
    max_caption_words: Optional[NonNegInt] = None
    min_width: Optional[NonNegInt] = None  # source width/height columns (the image is not fetched yet)
    min_height: Optional[NonNegInt] = None
    max_aspect_ratio: Optional[AspectRatio] = None  # max(w, h) / min(w, h)
    # Keep captions detected (offline, langid.py) as one of these ISO 639-1 codes, e.g. [en];
    # adds a `language` column. None: no language filter.
    languages: Optional[List[str]] = None
    min_language_score: Probability = 0.0  # normalised probability of the detected language
    # langid (offline, its model in the package) or fasttext (DataComp's detector), which needs
    # language_model: a fastText model file (lid.176.bin or lid.176.ftz), a local path.
    language_detector: Literal["langid", "fasttext"] = "langid"
    language_model: Optional[str] = None
    # Hash lists whose matching rows are dropped (Re-LAION's link removal), each its own funnel
    # step `blocklist_<name>`, right after has_url (and source.ids_url). docs/safety.md
    blocklists: List[BlocklistEntry] = field(default_factory=list)
    # Keep captions containing a word or phrase of this file (one per line; `#` lines skipped),
    # whole-word and case-insensitive (laionbuild/metadata/words.py): DataComp's text-based
    # baseline with ImageNet-21k synset names. A path or fsspec URL; None: no word filter.
    caption_word_list: Optional[str] = None

    def problems(self) -> Iterator[Problem]:
        yield from list_problems(self.blocklists, "blocklists")
        words = self.caption_word_list
        if words is not None and "://" not in words and not Path(words).expanduser().is_file():
            yield "caption_word_list", words, "is not a file (a word list: one word or phrase per line)"
        if self.languages is not None and not self.languages:
            yield "languages", self.languages, "use null for no language filter, not []"
        model = self.language_model
        if self.language_detector == "fasttext" and not model:
            yield ("language_model", model, "language_detector=fasttext needs a fastText model file, e.g. lid.176.bin "
                   "(https://fasttext.cc/docs/en/language-identification.html)")
        elif self.language_detector != "fasttext" and model:
            yield "language_model", model, "is read only by language_detector=fasttext: set that, or null this"
        elif model and ("://" in model or not Path(model).expanduser().is_file()):
            yield "language_model", model, "is not a local file (a fastText model, e.g. lid.176.bin: download it first)"
        for low, high in (("min_caption_chars", "max_caption_chars"), ("min_caption_words", "max_caption_words")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                yield low, lo, f"must be <= prepare.{high} ({hi})"


@dataclass
class DedupConfig:
    """Dedup across all parts of the build: the first occurrence in part order wins."""

    # Equal values in these canonical columns make rows duplicates. [] turns dedup off.
    keys: List[CanonicalColumn] = field(default_factory=lambda: ["url", "caption"])
    # Keep the captions of merged rows in a list column `captions` (MS-COCO: 5 rows per image).
    merge_captions: bool = False
    # DuckDB memory cap for the global dedup; beyond it DuckDB spills to data/.tmp.
    memory_limit: DuckdbMemory = "4GB"
    # local engine: rows are hash-partitioned on the dedup keys into buckets of about this many
    # rows, each deduplicated on its own, so time and memory grow linearly with the build
    bucket_rows: PosInt = 5_000_000

    def problems(self) -> Iterator[Problem]:
        if self.merge_captions and "caption" in self.keys:
            yield "merge_captions", True, "merging captions needs dedup.keys without caption (e.g. [url])"


@dataclass
class LocalServerConfig:
    # URLs on this host are served from `root` on 127.0.0.1 while the download stage runs.
    host: Optional[str] = None
    root: Optional[str] = None

    def problems(self) -> Iterator[Problem]:
        if (self.host is None) != (self.root is None):
            yield "", {"host": self.host, "root": self.root}, "set both host and root, or neither"
        elif self.root is not None and not Path(self.root).is_dir():
            yield "root", self.root, "is not a folder (the folder the download serves on 127.0.0.1 for `host`)"


@dataclass
class DownloadConfig:
    # False: no images (an embeddings-only build from source.image_embeddings, e.g. SISAP LAION2B)
    enabled: bool = True
    image_size: PosInt = 256
    resize_mode: ResizeMode = "border"
    encode_format: EncodeFormat = "jpg"
    encode_quality: Annotated[int, Field(ge=0, le=100)] = 95
    number_sample_per_shard: PosInt = 10000
    processes_count: PosInt = 2  # img2dataset processes
    thread_count: PosInt = 32  # download threads per process
    timeout: PosInt = 10
    retries: NonNegInt = 0
    min_image_size: NonNegInt = 0
    max_aspect_ratio: Optional[AspectRatio] = None  # None: no limit
    compute_hash: Optional[HashName] = "sha256"  # None: no hash column
    max_image_area: Optional[PosFloat] = None  # pixels; larger images fail as "image area too large"
    # X-Robots-Tag directives that opt an image out (honoured by default, as img2dataset does)
    disallowed_header_directives: List[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    user_agent_token: Optional[str] = None  # e.g. laionbuild: matched in X-Robots-Tag "token: ..." rules
    # Politeness (in each worker's urllib, laionbuild/web/policy_opener.py): concurrent requests per
    # host across all download processes of a machine (None: no cap), and the first back-off
    # delay after a 429 (doubling)
    max_per_host: Optional[PosInt] = 4
    backoff_seconds: NonNegFloat = 1.0
    # Re-attempt transient failures (timeouts, connection errors, 429, 5xx) this many times at
    # the end of the stage, `retry_delay` seconds apart (`laionbuild retry-failed` does it later)
    retry_rounds: NonNegInt = 0
    retry_delay: NonNegFloat = 5.0
    # Refuse URLs whose host is/resolves to an address that is not globally routable (loopback,
    # private, CGNAT, link-local, multicast, reserved...; checked again at every redirect and
    # connection). Schemes other than http(s) are refused whatever this says.
    allow_private_urls: bool = False
    private_host_allowlist: List[str] = field(default_factory=list)  # hosts exempt (e.g. an internal mirror)
    local_server: LocalServerConfig = field(default_factory=LocalServerConfig)
    # Where img2dataset writes the shards: None = in the workspace (data/images, DVC-cached); an
    # fsspec URL (s3://bucket/prefix, gs://…, hdfs://…, file:///mnt/shared/…) = there, one
    # prefix per distinct stage input, data/images/part_N keeping a manifest (laionbuild/shards/storage.py)
    shards_url: Optional[str] = None

    def problems(self) -> Iterator[Problem]:
        yield from _nested("local_server", self.local_server)
        url = self.shards_url
        if url is not None and not (("://" in url and not url.startswith("file://"))
                                    or url.removeprefix("file://").startswith("/")):
            yield ("shards_url", url, "an fsspec URL (s3://bucket/prefix, file:///mnt/shared/x) or an absolute "
                   "path (executors resolve relative paths in their own directory)")


@dataclass
class ModelSpec:
    """One more model embedded per part (embed.extra_models.NAME)."""

    model: str = "ViT-L-14"  # any open_clip architecture
    pretrained: str = "openai"  # an open_clip pretrained tag, a local checkpoint path, or `random`
    seed: int = 0  # used by `random` only

    def problems(self) -> Iterator[Problem]:
        yield from _model_problems(self.model, self.pretrained)


@dataclass
class EmbedConfig:
    model: str = "ViT-B-32"  # any open_clip architecture
    # An open_clip pretrained tag (e.g. laion2b_s34b_b79k), a local checkpoint path, or
    # `random` (seeded untrained weights: offline, and labelled untrained in every output).
    pretrained: str = "laion2b_s34b_b79k"
    seed: int = 0
    batch_size: PosInt = 64
    num_prepro_workers: NonNegInt = 2
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"  # auto | cpu | cuda | cuda:N
    # Take the source's precomputed image embeddings (source.image_embeddings) for the part's
    # rows instead of running the model: no images needed, no text embeddings.
    from_source: bool = False
    # The array of an .npz source.image_embeddings file to take (DataComp: l14_img or b32_img;
    # source.image_embeddings_model says which model made it). None: the file is an .npy.
    from_source_array: Optional[str] = None
    # More models embedded per part besides embed.model, by name (LAION-5B: ViT-B/32 for the CLIP
    # similarity filter, ViT-L/14 for the NSFW/watermark heads and the index). Their embeddings go
    # to data/embed/part_N/models/NAME/; tag.clip_similarity_model, tag.heads.X.model,
    # tag.near_dup.model, index.model and export.model name the one they use (null: embed.model).
    extra_models: Dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], ModelSpec] = field(
        default_factory=dict)  # names are identifiers: they name folders and tag keys
    # A text encoder that is not embed.model's own text tower, paired with its image tower: a local
    # folder (loaded offline) of a sentence-transformers model (e.g. clip-ViT-B-32-multilingual-v1)
    # or an M-CLIP model (e.g. M-CLIP/XLM-Roberta-Large-Vit-B-32) whose embeddings have embed.model's
    # width. It embeds the captions (text_emb, hence clip_similarity). None: embed.model's text tower.
    text_model: Optional[str] = None

    def problems(self) -> Iterator[Problem]:
        if not self.from_source:
            yield from _model_problems(self.model, self.pretrained)
        if self.text_model is not None:
            yield from _text_model_problems(self.model, self.text_model)
        for name, spec in self.extra_models.items():
            yield from _nested(f"extra_models.{name}", spec)
        if self.from_source and self.extra_models:
            yield "extra_models", sorted(self.extra_models), "models need images, which embed.from_source builds lack"


@dataclass
class FacesConfig:
    # none (no face tags) | auto (retinaface when its weights file exists, else opencv_haar) |
    # opencv_haar (cascades shipped in OpenCV, offline) | retinaface (the retina-face package)
    detector: FaceDetectorName = "none"
    weights: Optional[str] = None  # retinaface weights file; None: $DEEPFACE_HOME/.deepface/weights/retinaface.pth
    min_score: Probability = 0.5  # faces below this score are not reported
    processes: PosInt = 2  # shards of a part are tagged in parallel, one process per shard
    # retinaface: upscale each image so its shorter side is 1024 px (the package's default; finds
    # small faces in thumbnails, ~20x slower on CPU)
    upscale: bool = False


@dataclass
class HeadConfig:
    kind: HeadKind = "linear"  # laionbuild/models/heads.py documents each format
    path: str = ""  # weights file (.pth state dict or .npz); missing: the tag is skipped with a warning
    sigmoid: Optional[bool] = None  # None: the format's default
    activation: Optional[ActivationName] = None  # mlp: between layers; None: the format's default
    model: Optional[str] = None  # the embed.extra_models entry whose image embeddings it scores; None: embed.model

    def problems(self) -> Iterator[Problem]:
        if not self.path:
            yield "path", self.path, "must be set (the head's weights file)"


@dataclass
class NearDupConfig:
    enabled: bool = False
    index: str = "Flat"  # faiss index_factory string; Flat is exact (quadratic), HNSW32 scales
    model: Optional[str] = None  # embed.extra_models entry whose image embeddings it compares; None: embed.model


@dataclass
class ClustersConfig:
    """DataComp's image-based rule (the global clusters stage, docs/recipes.md): k-means
    centroids over the build's image embeddings (or given as a file), the clusters nearest to
    target embeddings (e.g. ImageNet-1k's), and each sample's nearest centroid."""

    enabled: bool = False
    model: Optional[str] = None  # embed.extra_models entry whose image embeddings it clusters; None: embed.model
    # Centroids as a file (.npy, or a torch.save'd array/tensor .pt as DataComp publishes them);
    # None: faiss k-means over the build (num_clusters, sample_fraction, niter, seed).
    centroids: Optional[str] = None
    num_clusters: PosInt = 100_000
    sample_fraction: Fraction = 1.0  # of each part's samples, drawn with `seed` (DataComp: 0.3 for large)
    niter: PosInt = 20
    seed: NonNegInt = 0
    # Target embeddings (.npy, .npz, or .pt: an array, a tensor or a dict with `image_features`
    # as DataComp's ImageNet-1k files): the clusters nearest to one of them are the targets.
    targets: List[str] = field(default_factory=list)


@dataclass
class WatermarkConfig:
    """LAION-5B's pixel watermark model on the downloaded images -> tag column `watermark_score`
    (the watermark stage; laionbuild/models/watermark.py, docs/watermark.md)."""

    # the checkpoint, LAION-5B-WatermarkDetection's watermark_model_v1.pt (a torch state dict);
    # None: no watermark tag. A missing file skips the tag with a warning (compose refuses a
    # select rule on watermark_score without the file)
    weights: Optional[str] = None
    architecture: str = "efficientnet_b3a"  # the timm backbone (LAION's; timm 1.0 maps it to efficientnet_b3)
    # hidden sizes of the classifier head that replaces timm's: Linear-ReLU-Dropout, Linear-ReLU, ..., Linear(-, 2)
    head: List[PosInt] = field(default_factory=lambda: [625, 256])
    image_size: PosInt = 256  # images are resized to image_size x image_size (no crop), as LAION did
    batch_size: PosInt = 32  # images per forward pass
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"  # auto | cpu | cuda | cuda:N
    decode_threads: PosInt = 2  # threads decoding and resizing the images of a batch

    def problems(self) -> Iterator[Problem]:
        if self.weights in UNSET:
            yield ("weights", self.weights, "give the watermark checkpoint's path (LAION's watermark_model_v1.pt), "
                   "or null for no watermark tag (docs/watermark.md)")


@dataclass
class TagConfig:
    # Which tags the tag stage computes. clip_similarity and the image sizes are always there.
    clip_similarity: bool = True
    clip_similarity_model: Optional[str] = None  # embed.extra_models entry; None: embed.model
    faces: FacesConfig = field(default_factory=FacesConfig)
    # LAION-5B's watermark probability from the pixels (tag column watermark_score)
    watermark: WatermarkConfig = field(default_factory=WatermarkConfig)
    # Score heads on the image embeddings: tag column name -> head (e.g. aesthetic_score, nsfw_score).
    heads: Dict[str, HeadConfig] = field(default_factory=dict)
    # Near-duplicate tag over all parts (the global neardup stage).
    near_dup: NearDupConfig = field(default_factory=NearDupConfig)
    # Nearest k-means cluster of each sample and whether it is a target cluster (global clusters stage).
    clusters: ClustersConfig = field(default_factory=ClustersConfig)
    # Columns of the prepared metadata carried into the tag table as they are (a pool's own
    # scores, e.g. DataComp's clip_l14_similarity_score), for select rules (min_scores,
    # max_scores, top_fraction) to use without recomputing them. A `uid` listed here (32 hex digits, as
    # DataComp's) makes select write data/selected/uids.npy.
    source_columns: List[str] = field(default_factory=list)
    # Re-LAION's keyword list (local path or fsspec URL, one keyword or phrase a line, UTF-8; blank
    # lines and lines starting with # are skipped): tag column `unsafe_keyword`, whether the caption
    # holds a listed keyword as a whole word, any case; select.unsafe_keywords rules on it.
    unsafe_keywords: Optional[str] = None

    def problems(self) -> Iterator[Problem]:
        for name, head in self.heads.items():
            yield from _nested(f"heads.{name}", head)
        taken = {"key", "part", "clip_similarity", "width", "height", "face_count", "face_max_score", "face_boxes",
                 "watermark_score", "unsafe_keyword", *self.heads}
        if self.unsafe_keywords in UNSET:
            yield ("unsafe_keywords", self.unsafe_keywords, "the keyword list must be given: its local path or fsspec "
                   "URL, e.g. tag.unsafe_keywords=/lists/keywords.txt (docs/safety.md)")
        for name in self.source_columns:
            if name in taken:
                yield "source_columns", list(self.source_columns), f"`{name}` is a tag the tag stage computes"
        if len(set(self.source_columns)) != len(self.source_columns):
            yield "source_columns", list(self.source_columns), "names a column twice"
        yield from _nested("watermark", self.watermark)
        if self.watermark.weights is not None and "watermark_score" in self.heads:
            yield ("heads.watermark_score", self.heads["watermark_score"].path, "names the column the pixel "
                   "watermark model (tag.watermark.weights) writes: rename this head, or set tag.watermark.weights=null")


@dataclass
class UnsafeKeywords:
    """Re-LAION's research rule: drop samples whose unsafe score is above `above` AND whose
    caption holds a keyword of tag.unsafe_keywords' list (the `unsafe_keyword` tag; docs/safety.md)."""

    # a tag column: a tag.heads score (e.g. nsfw_score) or a metadata column listed in
    # tag.source_columns (e.g. the source's punsafe)
    score: str = "nsfw_score"
    above: float = 0.95  # strictly above


@dataclass
class SelectConfig:
    # Keep samples whose CLIP image-text cosine is >= this (None: no CLIP rule).
    min_clip_similarity: Optional[Cosine] = None
    # Per-language thresholds instead, by the samples' `language` column (source.columns.language,
    # e.g. LAION-2B-multi's LANGUAGE, or prepare.languages' detection): language code -> minimum;
    # other languages (and samples without one) get min_clip_similarity (None: no CLIP rule for them).
    min_clip_similarity_by_language: Dict[str, Cosine] = field(default_factory=dict)
    # Face rules (need tag.faces.detector): at least this many faces / a face scoring at least this.
    min_faces: Optional[NonNegInt] = None
    min_face_score: Optional[Probability] = None
    # Semantic dedup (needs tag.near_dup.enabled): keep samples whose image embedding's cosine to
    # every earlier sample is below this.
    max_near_dup_similarity: Optional[Cosine] = None
    # DataComp's image-based rule (needs tag.clusters with targets): keep samples whose nearest
    # centroid is one of the target clusters.
    in_target_clusters: bool = False
    # Score-head tags (tag.heads): keep samples whose score is >= / <= these, per tag column.
    min_scores: Dict[str, float] = field(default_factory=dict)
    max_scores: Dict[str, float] = field(default_factory=dict)
    # Drop samples scoring above a threshold whose caption has a listed keyword (Re-LAION research)
    unsafe_keywords: Optional[UnsafeKeywords] = None
    # Keep the top fraction of the build's tagged samples by a tag column, e.g.
    # {clip_l14_similarity_score: 0.3} (DataComp's CLIP-score baseline): the threshold is
    # DataComp's get_threshold over every part (the value at index int(N * fraction) of the
    # column sorted high to low, nulls last), and every sample scoring >= it is kept (ties too).
    top_fraction: Dict[str, Fraction] = field(default_factory=dict)
    # Over what top_fraction's threshold is taken: `tagged`, the samples that reach select (after
    # prepare's filters and dedup), or `source`, every row of the source parts as published
    # (DataComp's get_threshold over the whole pool, as DataComp-1B's rule takes it; the column
    # must then be a source column).
    top_fraction_of: Literal["tagged", "source"] = "tagged"
    # Hash lists of downloaded images (Re-LAION's image-hash removal): the `screen` stage matches
    # them against img2dataset's download.compute_hash column; each is a funnel step
    # `image_blocklist_<name>`, before the other rules. docs/safety.md
    image_blocklists: List[ImageBlocklistEntry] = field(default_factory=list)

    def problems(self) -> Iterator[Problem]:
        yield from list_problems(self.image_blocklists, "image_blocklists")


@dataclass
class AssembleConfig:
    samples_per_shard: PosInt = 10000
    embeddings_per_file: PosInt = 1_000_000
    # false: a sweep point is its selection only (data/selected): assemble writes no shards or
    # embeddings, only a marker (project/outputs.UNMATERIALIZED_FILE), so a point costs a
    # selection, not a copy of the images; `laionbuild materialize` builds the point's outputs.
    materialize: bool = True


@dataclass
class ExportConfig:
    """Extra export formats of the selected samples (data/export/), streamed part by part."""

    # h5: data/export/emb.h5, dataset `emb` (N x dim) of the image embeddings in dataset order
    h5: bool = False
    h5_dtype: Literal["float16", "float32"] = "float16"
    model: Optional[str] = None  # whose image embeddings: an embed.extra_models entry; None: embed.model
    # tsv: data/export/metadata.tsv with these columns, same row order: output name -> column of
    # the prepared metadata (e.g. {caption: caption, NSFW: nsfw}). {}: no TSV. Fields holding tabs,
    # newlines or quotes are quoted (RFC 4180 style, read back by csv/pandas with sep=tab).
    tsv_columns: Dict[str, str] = field(default_factory=dict)


@dataclass
class IndexConfig:
    model: Optional[str] = None  # whose image embeddings to index: an embed.extra_models entry; None: embed.model
    index_key: Optional[str] = None  # None: autofaiss picks one
    metric_type: Literal["ip", "l2"] = "ip"
    max_index_memory_usage: FaissMemory = "4G"
    current_memory_available: FaissMemory = "8G"
    max_index_query_time_ms: PosFloat = 10.0
    nb_cores: Optional[PosInt] = None  # None: all cores
    # the index report (data/metrics/index.json): this many sampled text-embedding queries
    report_queries: NonNegInt = 1000
    report_seed: int = 0


@dataclass
class EngineConfig:
    name: Literal["local", "spark"] = "local"  # local: DuckDB in-process
    # spark only: local[N], spark://host:port, yarn, or `active` (the session of this process)
    master: str = "local[2]"
    driver_memory: SparkMemory = "4g"
    shuffle_partitions: PosInt = 8
    conf: Dict[str, str] = field(default_factory=dict)  # extra spark.* settings
    # spark only: a folder every executor can write and the driver read (a shared mount, hdfs://,
    # s3://...) for intermediate files (autofaiss's per-task indices); None: data/.tmp (local[N])
    shared_tmp: Optional[str] = None
    # local only: DuckDB threads while writing ordered parquet (prepare, dedup). Order is kept by
    # buffering row groups per thread: on 2 cores 1 thread is as fast and halves peak memory;
    # raise it on many cores for speed
    write_threads: PosInt = 1
    # local only: DuckDB memory cap for prepare's blocklist joins (prepare.blocklists); beyond it
    # DuckDB spills to data/.tmp. Speed only: the same rows are dropped whatever it is
    join_memory_limit: DuckdbMemory = "2GB"


# the recipe's sections, in pipeline order: one config group (conf/<section>/) each
GROUPS = {"recipe": RecipeInfo, "source": SourceConfig, "subset": SubsetConfig, "prepare": PrepareConfig,
          "dedup": DedupConfig, "download": DownloadConfig, "embed": EmbedConfig, "tag": TagConfig,
          "select": SelectConfig, "assemble": AssembleConfig, "export": ExportConfig, "index": IndexConfig,
          "engine": EngineConfig}
Config = dataclass(dataclasses.make_dataclass(
    "Config", [(name, kind, field(default_factory=kind)) for name, kind in GROUPS.items()],
    namespace={"__module__": __name__, "__doc__": "A whole recipe: one section per config group."}))


SECTIONS = tuple(Config.__dataclass_fields__)

# Knobs that change how fast a stage runs, how much memory it takes or how hard it retries, and
# never what it writes. dvc.yaml leaves them out of every stage's params (it lists the other keys
# of these sections one by one; tests/test_speed_knobs.py checks that every other key of a
# section a stage reads is listed), and no fingerprint hashes them (the download's work dir,
# the shards_url prefix, the dataset card), so moving a build to a bigger machine reruns nothing.
SPEED_KNOBS = frozenset({
    "source.fetch_retries",  # a fetch gives the same file or fails the stage
    "source.fetch_backoff_s",
    "dedup.memory_limit",  # DuckDB spills (and picks more hash buckets) beyond it: same survivors
    "dedup.bucket_rows",  # the first occurrence wins in every bucket layout
    "download.processes_count",  # img2dataset's shards are cut from the input, not per process
    "download.thread_count",
    "embed.batch_size",
    "embed.num_prepro_workers",
    "embed.device",
    "tag.faces.processes",  # shards tagged in parallel, each on its own
    "tag.watermark.batch_size",  # per image, the same scores in any batch (CPU and GPU may differ in the last bits)
    "tag.watermark.device",
    "tag.watermark.decode_threads",
    "index.nb_cores",
})
# `engine` as a whole is not a parameter either: both engines give the same rows (dvc.yaml).
UNTRACKED_SECTIONS = ("engine",)


def without_speed_knobs(raw: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A copy of the recipe (or of its section at `prefix`, e.g. `download`) as plain data
    without the speed knobs and the untracked sections: what decides the outputs."""
    out = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else key
        if path in SPEED_KNOBS or path in UNTRACKED_SECTIONS:
            continue
        out[key] = without_speed_knobs(value, path) if isinstance(value, dict) else value
    return out


def _nested(key: str, section: Any) -> Iterator[Problem]:
    """The problems of a section inside a section, with their keys under `key`."""
    for sub, value, message in section.problems():
        yield (f"{key}.{sub}" if sub else key), value, message


def _formats_with_part(pattern: str, **names: str) -> bool:
    try:
        pattern.format(part=0, **names)
    except (KeyError, IndexError, ValueError):
        return False
    return True


def _model_problems(model: str, pretrained: str) -> Iterator[Problem]:
    from laionbuild.recipe.open_clip_catalog import model_problem, pretrained_problem

    problem = model_problem(model)
    if problem:
        yield "model", model, problem
    elif problem := pretrained_problem(model, pretrained):
        yield "pretrained", pretrained, problem


def _text_model_problems(model: str, text_model: str) -> Iterator[Problem]:
    from laionbuild.models import text_encoders
    from laionbuild.recipe.open_clip_catalog import embed_dim

    if text_model in UNSET:
        yield ("text_model", text_model, "the text encoder must be given: the local folder of a sentence-transformers "
               "or M-CLIP model, e.g. embed.text_model=/models/clip-ViT-B-32-multilingual-v1 (docs/multilingual.md)")
        return
    try:
        width = text_encoders.dim(text_model)
    except (text_encoders.TextModelError, KeyError, TypeError, ValueError) as exc:
        yield "text_model", text_model, str(exc)
        return
    image_width = embed_dim(model)
    if image_width is not None and width != image_width:
        yield ("text_model", text_model, f"embeds captions in {width} dimensions, and embed.model {model}'s image "
               f"embeddings have {image_width}: the pair must share one embedding space (a text encoder "
               f"distilled into {model}'s)")


def to_config(raw: Dict[str, Any] | DictConfig, where: str = "recipe", origin: Optional[Origin] = None) -> Config:
    """Type-check `raw` against the schema (unknown keys, types, ranges, value sets), then the
    checks of each section and across sections (laionbuild/recipe/checks.py)."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(raw, DictConfig):
        try:
            raw = OmegaConf.to_container(raw, resolve=True)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None)
            raise RecipeError(f"{where}: `{key}`: {str(exc).splitlines()[0]}" if key else
                              f"{where}: {str(exc).splitlines()[0]}") from None
    return validate(Config, raw, where, origin)


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
        atomic_write_bytes(memo, pickle.dumps(cfg))
    return cfg


def _schema_sources() -> List[Path]:
    """What validation reads besides params.yaml: every module of the recipe package (this one
    included), the language list and laionbuild's model configs; a change invalidates the memo."""
    package = Path(__file__).resolve().parents[1]
    return [*sorted(Path(__file__).resolve().parent.glob("*.py")), package / "metadata" / "language.py",
            *sorted((package / "models" / "model_configs").glob("*.json"))]


def _installed(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def _params_memo(path: Path) -> Path | None:
    """Where a project's validated params.yaml is remembered (None for a file elsewhere)."""
    if path.name != "params.yaml" or not (path.parent / "dvc.yaml").exists():
        return None
    digest = hashlib.sha256(path.read_bytes())
    for source in _schema_sources():
        digest.update(source.read_bytes())
    digest.update(_installed("open_clip_torch").encode())  # its pretrained tags are checked
    return path.parent / "data" / ".work" / "params" / f"{digest.hexdigest()[:32]}.pickle"


def missing_keys(raw: Dict[str, Any], schema: type = None, prefix: str = "") -> List[str]:
    """Keys of the schema's fixed sections a params.yaml lacks (free-form mappings not entered).
    Hydra writes every key, so a missing one was deleted by hand: refused, never defaulted."""
    schema = schema or Config
    missing = []
    for name, tp in typing.get_type_hints(schema).items():
        if name not in raw:
            missing.append(f"{prefix}{name}")
        elif dataclasses.is_dataclass(tp) and isinstance(raw[name], dict):
            missing += missing_keys(raw[name], tp, f"{prefix}{name}.")
    return missing


def _load_and_validate(path: Path) -> Config:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(yaml_error_message(exc, path)) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if raw is None:
        raise RecipeError(f"{path}: is empty; write it with `laionbuild compose`")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}) at the top level")
    # DVC's Hydra composition writes every key and may add Hydra's own, never others
    if missing := missing_keys(raw):
        raise RecipeError(f"{path}: missing {', '.join(f'`{k}`' for k in missing)}: a params.yaml must hold "
                          "every key (missing ones are not filled with defaults); write it with `laionbuild compose`")
    return to_config(raw, where=str(path))


def yaml_error_message(exc: Exception, path: Path | str | None = None) -> str:
    """`file:line:column: not valid YAML: problem`, one line."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    name = str(path) if path is not None and (mark is None or mark.name.startswith("<")) else mark.name
    where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: not valid YAML: {problem}"


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))


def compose(overrides: List[str], conf_dir: str | Path = "conf", config_name: str = "config") -> Config:
    """Compose `conf/config.yaml` with Hydra override grammar, then validate. A dataset repo's
    config.yaml lists the shipped conf/ in `hydra.searchpath` (`laionbuild://conf`): its own
    groups and recipes are searched first, the shipped ones after."""
    raw, where, origin = _hydra_compose(overrides, conf_dir, config_name)
    return to_config(raw, where=where, origin=origin)


SplitName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")]


@dataclass
class SplitsRecipe:
    """A split build's recipe (conf/recipe/laion5b.yaml; docs/multilingual.md): one build per
    split, each of its own recipe (`splits`: split name -> conf/recipe/NAME), in the folder
    splits/<split>/ of one DVC repository, and the `union` stage over their selections. It has
    no other section: each split's recipe is its own params.yaml."""
    recipe: RecipeInfo = field(default_factory=RecipeInfo)
    splits: Dict[SplitName, str] = field(default_factory=dict)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def compose_splits_recipe(overrides: List[str], conf_dir: str | Path = "conf",
                          config_name: str = "config") -> Optional[SplitsRecipe]:
    """The split build the overrides' recipe is (a recipe with a top-level `splits:` mapping),
    composed from the `recipe=`/`recipe.*` overrides only; None for a recipe of one build."""
    from omegaconf import OmegaConf

    from laionbuild.recipe.validate import typed

    picked = [o for o in overrides if _override_key(o) == "recipe" or _override_key(o).startswith("recipe.")]
    try:
        raw, where, origin = _hydra_compose(picked, conf_dir, config_name)
    except RecipeError:
        return None  # (not a split build's recipe either: the full compose says what is wrong)
    if "splits" not in raw:
        return None
    recipe = typed(SplitsRecipe, OmegaConf.to_container(raw, resolve=True), where, origin)
    taken = sorted(set(recipe.splits) & (set(GROUPS) | {"splits", "hydra"}))
    if taken:  # `SPLIT.key=value` goes to that split: a split named like a section would take its overrides
        raise RecipeError(f"{where}: split `{taken[0]}` is named like a recipe section ({', '.join(sorted(GROUPS))}): "
                          "rename it (e.g. laion2b_en), so `section.key=value` overrides still go to every split")
    if not recipe.splits:
        raise RecipeError(f"{where}: `splits` is empty: name each split and the recipe it builds, "
                          "e.g. splits: {laion2b_en: laion5b_en}")
    return recipe


def _hydra_compose(overrides: List[str], conf_dir: str | Path, config_name: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    from laionbuild.project.template import shipped_conf

    conf_dir = Path(conf_dir).resolve()
    if not (conf_dir / f"{config_name}.yaml").exists():
        raise RecipeError(f"{conf_dir / (config_name + '.yaml')}: not found")
    where = f"recipe composed from {conf_dir.name}/" + (f" with overrides {list(overrides)}" if overrides else "")
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            raw = hydra_compose(config_name=config_name, overrides=list(overrides))
            searched = [conf_dir, *([shipped_conf()] if shipped_conf() != conf_dir else [])]
            files = defaults_files(searched, config_name, overrides)
    except YAMLError as exc:
        raise RecipeError(yaml_error_message(exc)) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise RecipeError(hydra_message(exc, where)) from None
    return raw, where, composed_origin(overrides, files, searched)


def hydra_message(exc: Exception, where: str) -> str:
    """Hydra's refusal in one line, with a did-you-mean for an unknown key set without `+`."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    unknown = re.match(r"Could not override '([^']+)'", lines[0])
    cause = exc.__cause__ or exc.__context__
    if unknown and "not in struct" in str(cause):
        key = unknown.group(1)
        path = key.split(".")
        hydra_hint = next((line for line in lines if line.startswith("To append")), "")
        hydra_hint = hydra_hint[:1].lower() + hydra_hint[1:]
        hint = unknown_key_hint(Config, path)
        if path[-1] in fields_at(Config, path[:-1]) or hint == FREE_FORM:  # a new entry of a mapping
            return f"{where}: `{key}` is a new entry of a mapping: {hydra_hint or 'prefix it with +'}"
        return f"{where}: unknown key `{key}`: {hint}"
    lines = lines[:next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))]
    return f"{where}: {' '.join(lines)}"
