"""`laionbuild projector BUILD... --out DIR`: the image embeddings of one or several builds as
one TensorBoard projector dataset, each point labelled with its build — e.g. LAION-Face next
to an MS-COCO face build in one view.

BUILD is `[LABEL=]PATH[@REV]`: a built project directory, its workspace or (with `@REV`) the
build at a git revision or DVC experiment name of that project, read from DVC's cache through
`dvc.api.DVCFileSystem` (`dvc exp show` lists experiments). The label defaults to the
directory's name (plus `@REV`).

Read from each build: `data/embeddings/img_emb` + `metadata` (clip-retrieval's layout, rows in
dataset order) and the images from `data/dataset/*.tar`; of an unmaterialised sweep point
(`build -m`: assemble.materialize=false), its selection (`data/selected`) with each part's
`data/embed` and the download's shards, the same rows `laionbuild materialize` would write. Written to DIR, in the projector's
formats: `tensors.tsv` (N rows of D tab-separated floats, no header), `metadata.tsv` (a header
`build caption url key`, then N rows; tabs and newlines in captions become spaces),
`sprite.png` (the N thumbnails in row-major order on a ceil(sqrt N)-square grid, at most
8192 px a side) and `projector_config.pbtxt` pointing at them: `tensorboard --logdir DIR`
shows them in its Projector tab."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
from PIL import Image

from laionbuild.project.atomic import atomic_dir
from laionbuild.project.files import by_number
from laionbuild.project.layout import KEY_COLUMN
from laionbuild.project.outputs import UNMATERIALIZED_FILE
from laionbuild.recipe.errors import InputError, MissingInputError
from laionbuild.shards.thumbs import ShardImages, thumbnail

MAX_SPRITE = 8192  # px, TensorBoard's limit for a sprite's side
MIN_CELL = 8


@dataclass
class BuildRef:
    label: str
    path: Path
    rev: str | None


def parse_build(spec: str) -> BuildRef:
    """`[LABEL=]PATH[@REV]`."""
    label = None
    head, sep, tail = spec.partition("=")
    if sep and head and "/" not in head and "@" not in head:
        label, spec = head, tail
    path, rev = spec, None
    before, sep, after = spec.rpartition("@")
    if sep and before and "/" not in after:
        path, rev = before, after
    root = Path(path).expanduser()
    if not root.is_dir():
        raise MissingInputError(f"{spec}: {root} is not a directory (BUILD is [LABEL=]PATH[@REV])")
    return BuildRef(label or (root.resolve().name + (f"@{rev}" if rev else "")), root, rev)


class _Files:
    """A build's files, from its workspace or, at a revision, from DVC (git + DVC's cache)."""

    def __init__(self, ref: BuildRef):
        self.ref = ref
        self.fs = None
        if ref.rev:
            from dvc.api import DVCFileSystem
            from dvc.repo import Repo
            from dvc.scm import RevError, resolve_rev

            try:
                with Repo(str(ref.path)) as repo:
                    commit = resolve_rev(repo.scm, ref.rev)  # a git revision or an experiment's name
            except RevError as exc:
                raise InputError(f"{ref.label}: `{ref.rev}` is neither a git revision nor a DVC experiment of "
                                 f"{ref.path} ({exc})") from None
            self.fs = DVCFileSystem(str(ref.path), rev=commit)

    def list(self, directory: str, suffix: str) -> list[str]:
        if self.fs is None:
            return sorted(str(p.relative_to(self.ref.path)) for p in (self.ref.path / directory).glob(f"*{suffix}"))
        if not self.fs.exists(directory):
            return []
        return sorted(p.lstrip("/") for p in self.fs.ls(directory, detail=False) if p.endswith(suffix))

    def open(self, path: str) -> BinaryIO:
        return open(self.ref.path / path, "rb") if self.fs is None else self.fs.open(path, "rb")

    def read(self, path: str) -> bytes:
        with self.open(path) as f:
            return f.read()


def load_build(ref: BuildRef, limit: int | None) -> tuple[np.ndarray, pd.DataFrame, ShardImages]:
    """(embeddings, metadata with key/url/caption, its dataset shards' images) of one build;
    with `limit`, that many rows evenly spaced over the build."""
    files = _Files(ref)
    where = f"{ref.path}{'@' + ref.rev if ref.rev else ''}"
    if files.list("data/embeddings", UNMATERIALIZED_FILE):  # a sweep point: its selection only
        embeddings, metadata, images = _selection(files, ref, where)
        if limit is not None and len(metadata) > limit:
            rows = np.linspace(0, len(metadata) - 1, limit).round().astype(int)
            embeddings, metadata = embeddings[rows], metadata.iloc[rows].reset_index(drop=True)
        return embeddings, metadata, images
    emb_files = by_number(files.list("data/embeddings/img_emb", ".npy"))
    meta_files = by_number(files.list("data/embeddings/metadata", ".parquet"))
    if not emb_files or not meta_files:
        raise MissingInputError(f"{ref.label}: no data/embeddings in {where}; build it first (`laionbuild build`)")
    embeddings = np.concatenate([np.load(io.BytesIO(files.read(f))) for f in emb_files]).astype(np.float32)
    metadata = pd.concat([pd.read_parquet(io.BytesIO(files.read(f)), columns=["key", "url", "caption"])
                          for f in meta_files], ignore_index=True)
    if len(embeddings) != len(metadata):
        raise InputError(f"{ref.label}: {len(embeddings)} embeddings but {len(metadata)} metadata rows in "
                         f"{where}/data/embeddings; rebuild assemble")
    if limit is not None and len(metadata) > limit:
        rows = np.linspace(0, len(metadata) - 1, limit).round().astype(int)
        embeddings, metadata = embeddings[rows], metadata.iloc[rows].reset_index(drop=True)
    images = ShardImages(open_file=files.open)
    for shard in files.list("data/dataset", ".tar"):
        images.add_shard(shard)
    return embeddings, metadata, images


def _selection(files: _Files, ref: BuildRef, where: str) -> tuple[np.ndarray, pd.DataFrame, ShardImages]:
    """An unmaterialised point (assemble.materialize=false): its selected samples (data/selected,
    build order) with their image embeddings and captions from each part's data/embed, and
    their images from the download's shards, what `laionbuild materialize` would write."""
    if not files.list("data/selected", "selected.parquet"):
        raise MissingInputError(f"{ref.label}: no data/selected in {where}; build it first (`laionbuild build`)")
    selected = pd.read_parquet(io.BytesIO(files.read("data/selected/selected.parquet")), columns=["part", "key"])
    embeddings, metadata = [], []
    images = ShardImages(open_file=files.open)
    for part, keys in selected.groupby("part", sort=False)["key"]:
        base = f"data/embed/part_{part}"
        meta = pd.read_parquet(io.BytesIO(files.read(f"{base}/metadata/metadata_0.parquet")),
                               columns=[KEY_COLUMN, "url", "caption"])
        row_of = pd.Series(np.arange(len(meta)), index=meta[KEY_COLUMN].astype(str))
        rows = row_of.loc[keys.astype(str)].to_numpy()
        embeddings.append(np.load(io.BytesIO(files.read(f"{base}/img_emb/img_emb_0.npy")))[rows].astype(np.float32))
        metadata.append(meta.iloc[rows].rename(columns={KEY_COLUMN: "key"})[["key", "url", "caption"]])
        wanted = set(keys.astype(str))
        for table in files.list(f"data/images/part_{part}", ".parquet"):
            shard = pd.read_parquet(io.BytesIO(files.read(table)), columns=["key", "status", KEY_COLUMN])
            ok = shard[(shard["status"] == "success") & shard[KEY_COLUMN].astype(str).isin(wanted)]
            images.add_shard(table[:-len(".parquet")] + ".tar", dict(zip(ok[KEY_COLUMN].astype(str), ok["key"])))
    if not embeddings:
        raise InputError(f"{ref.label}: no sample is selected in {where}")
    return np.concatenate(embeddings), pd.concat(metadata, ignore_index=True), images


def _tsv_field(value) -> str:
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    return " ".join(text.replace("\t", " ").replace("\r", " ").replace("\n", " ").split())


def export(refs: list[BuildRef], out: Path, cell: int = 64, limit: int | None = None) -> dict:
    """Write the projector files of `refs` to `out` (replacing it whole). Returns a summary."""
    labels = [r.label for r in refs]
    if len(set(labels)) != len(labels):
        raise InputError(f"builds share a label: {labels}; name them LABEL=PATH")
    tensors, frames, shards = [], [], []
    try:
        for ref in refs:
            embeddings, metadata, images = load_build(ref, limit)
            shards.append(images)
            if tensors and embeddings.shape[1] != tensors[0].shape[1]:
                raise InputError(f"{ref.label}: {embeddings.shape[1]}-dimensional embeddings, {refs[0].label}: "
                                 f"{tensors[0].shape[1]}; a projector view needs one embedding space (same model)")
            tensors.append(embeddings)
            frames.append(metadata.assign(build=ref.label))
        n = sum(len(t) for t in tensors)
        side = math.ceil(math.sqrt(n))
        cell = min(cell, MAX_SPRITE // side)
        if cell < MIN_CELL:
            raise InputError(f"{n} points do not fit a {MAX_SPRITE}px sprite with thumbnails of at least "
                             f"{MIN_CELL}px: pass --max-per-build")
        sprite = Image.new("RGB", (side * cell, side * cell), "white")
        i = missing = 0
        for frame, images in zip(frames, shards):
            for key in frame["key"]:
                if key in images:
                    sprite.paste(thumbnail(images.read(key), cell, square=True), ((i % side) * cell, (i // side) * cell))
                else:
                    missing += 1
                i += 1
    finally:
        for images in shards:
            images.close()
    metadata = pd.concat(frames, ignore_index=True)[["build", "caption", "url", "key"]]
    with_sprite = missing < n
    with atomic_dir(out, beside=True) as tmp:  # `out` is anywhere, not under a project's data/
        np.savetxt(tmp / "tensors.tsv", np.concatenate(tensors), delimiter="\t", fmt="%.7g")
        lines = ["\t".join(metadata.columns)] + ["\t".join(_tsv_field(v) for v in row)
                                                 for row in metadata.itertuples(index=False)]
        (tmp / "metadata.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if with_sprite:
            sprite.save(tmp / "sprite.png")
        (tmp / "projector_config.pbtxt").write_text(pbtxt(" vs ".join(labels), with_sprite, cell))
    return {"points": n, "dimensions": int(tensors[0].shape[1]), "builds": {r.label: len(t) for r, t in zip(refs, tensors)},
            "sprite": f"{side * cell}x{side * cell}" if with_sprite else None, "missing_images": missing}


def pbtxt(name: str, with_sprite: bool, cell: int) -> str:
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    sprite = (f'  sprite {{\n    image_path: "sprite.png"\n    single_image_dim: {cell}\n'
              f'    single_image_dim: {cell}\n  }}\n') if with_sprite else ""
    return (f'embeddings {{\n  tensor_name: "{quoted}"\n  tensor_path: "tensors.tsv"\n'
            f'  metadata_path: "metadata.tsv"\n{sprite}}}\n')
