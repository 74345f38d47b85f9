"""assemble: the final dataset of the selected samples, in build order (part order, then
key order):

- `data/dataset/NNNNN.tar` webdataset shards (`KEY.jpg`, `KEY.txt`, `KEY.json` with key, url,
  caption and tags) + `NNNNN.parquet` with the same metadata, and `shardindex.json` (the
  shards and their sample counts, as `wids.ShardListDataset` reads them);
- `data/embeddings/{img_emb,text_emb,metadata}/` in clip-retrieval's layout, rows aligned with
  the shards.

Tar members get fixed owners and mtimes so the same inputs give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from laionbuild.project.atomic import atomic_dir, read_json, write_json
from laionbuild.project.layout import DATASET, EMBEDDINGS, KEY_COLUMN, SELECTED, embed_dir, part_dir
from laionbuild.project.outputs import UNMATERIALIZED, UNMATERIALIZED_FILE, selected_keys
from laionbuild.recipe.errors import InputError
from laionbuild.shards.samples import part_rows, part_samples

COPY_BUFSIZE = 16 << 20


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    def __init__(self, out: Path, per_shard: int):
        self.out, self.per_shard = out, per_shard
        self.shard, self.count, self.tar, self.rows = -1, 0, None, []
        self.shards: list[dict] = []  # the wids shard index: url (relative to it), nsamples, filesize

    def _roll(self) -> None:
        self.close()
        self.shard += 1
        # copybufsize: a member is written in one piece up to 16 MB (tarfile's default, 16 KB pieces,
        # copies a 1 MB image at ~0.4x `cp` in memory, one piece at ~0.65x; the bytes are the same)
        self.tar = tarfile.open(self.out / f"{self.shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT,
                                copybufsize=COPY_BUFSIZE)
        self.count, self.rows = 0, []

    def add(self, sample: dict) -> None:
        """A webdataset sample (laionbuild/shards/samples.py): its members in its order."""
        if self.tar is None or self.count >= self.per_shard:
            self._roll()
        key = sample["__key__"]
        for ext, data in sample.items():
            if ext != "__key__":
                _add(self.tar, f"{key}.{ext}", data)
        self.rows.append(json.loads(sample["json"]))
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            frame = pd.DataFrame(self.rows)
            frame["shard"] = self.shard
            frame.drop(columns=["tags"]).join(pd.json_normalize(frame["tags"])).to_parquet(
                self.out / f"{self.shard:05d}.parquet", index=False)
            name = f"{self.shard:05d}.tar"
            self.shards.append({"url": name, "nsamples": self.count, "filesize": (self.out / name).stat().st_size})
            self.tar = None

    def write_index(self, name: str) -> None:
        """`shardindex.json`: the shards as wids reads them (`wids.ShardListDataset(path)`)."""
        write_json(self.out / "shardindex.json", {"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                                  "name": name, "shardlist": self.shards})


FILE_NUMBER = 6  # digits: name order is number order up to a million files (10^12 rows at the default)


class _EmbeddingWriter:
    """Rows in dataset order -> clip-retrieval's layout (`img_emb/img_emb_NNNNNN.npy`,
    [`text_emb/text_emb_NNNNNN.npy`,] `metadata/metadata_NNNNNN.parquet`), `per_file` rows per file,
    numbered with a fixed width (FILE_NUMBER) so that name order is row order: autofaiss
    (embedding_reader) and clip-retrieval back read the files sorted by name, and with `_10`
    before `_2` the index's ids would point at other samples' metadata past ten files (10M
    samples at the default 1M rows per file; LAION's own releases pad to 4 digits too).
    holding at most one file's rows (plus the part being added), whatever the build's size.
    Arrays keep their dtype (LAION's float16 stays float16)."""

    def __init__(self, out: Path, per_file: int, kinds: tuple[str, ...]):
        self.out, self.per_file, self.kinds = out, per_file, kinds
        self.files, self.rows = 0, 0
        self.arrays: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
        self.meta: list[pd.DataFrame] = []
        self.buffered = 0
        for sub in (*kinds, "metadata"):
            (out / sub).mkdir(parents=True)

    def add(self, arrays: dict[str, np.ndarray], meta: pd.DataFrame) -> None:
        for kind in self.kinds:
            self.arrays[kind].append(np.asarray(arrays[kind]))
        self.meta.append(meta.reset_index(drop=True))
        self.buffered += len(meta)
        while self.buffered >= self.per_file:
            self._flush(self.per_file)

    def _flush(self, n: int) -> None:
        meta = pd.concat(self.meta, ignore_index=True)
        for kind in self.kinds:
            data = np.concatenate(self.arrays[kind])
            np.save(self.out / kind / f"{kind}_{self.files:0{FILE_NUMBER}d}.npy", data[:n])
            self.arrays[kind] = [data[n:]]
        meta.iloc[:n].to_parquet(self.out / "metadata" / f"metadata_{self.files:0{FILE_NUMBER}d}.parquet", index=False)
        self.meta = [meta.iloc[n:]]
        self.files += 1
        self.rows += n
        self.buffered -= n

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)


class _ParquetShards:
    """Metadata-only dataset shards (`NNNNN.parquet`, no tars) of an embeddings-only build."""

    def __init__(self, out: Path, per_shard: int):
        self.out, self.per_shard, self.shard, self.frames, self.buffered = out, per_shard, 0, [], 0

    def add(self, frame: pd.DataFrame) -> None:
        self.frames.append(frame)
        self.buffered += len(frame)
        while self.buffered >= self.per_shard:
            self._flush(self.per_shard)

    def _flush(self, n: int) -> None:
        frame = pd.concat(self.frames, ignore_index=True)
        frame.iloc[:n].assign(shard=self.shard).to_parquet(self.out / f"{self.shard:05d}.parquet", index=False)
        self.frames, self.buffered, self.shard = [frame.iloc[n:]], self.buffered - n, self.shard + 1

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)


def run(cfg) -> None:
    if not cfg.assemble.materialize:  # a sweep point: its selection only (data/selected)
        with atomic_dir(DATASET) as dataset_out, atomic_dir(EMBEDDINGS) as emb_out:
            for out in (dataset_out, emb_out):
                write_json(out / UNMATERIALIZED_FILE, UNMATERIALIZED)
        return
    selected = pq.ParquetFile(SELECTED / "selected.parquet")
    images_wanted = cfg.download.enabled
    kinds = ("img_emb", "text_emb") if all((part_dir("embed", p) / "text_emb").exists()
                                           for p in cfg.subset.parts) else ("img_emb",)
    with atomic_dir(DATASET) as dataset_out, atomic_dir(EMBEDDINGS) as emb_out:
        writer = (_ShardWriter if images_wanted else _ParquetShards)(dataset_out, cfg.assemble.samples_per_shard)
        # embed.model's embeddings in data/embeddings, each extra model's in data/embeddings/models/NAME
        embeddings = {None: _EmbeddingWriter(emb_out, cfg.assemble.embeddings_per_file, kinds)}
        for name in cfg.embed.extra_models:
            embeddings[name] = _EmbeddingWriter(emb_out / "models" / name, cfg.assemble.embeddings_per_file,
                                                ("img_emb", "text_emb"))
        for part in cfg.subset.parts:
            keys = selected_keys(selected, part)  # in build order
            if not keys:
                continue
            emb_meta = pd.read_parquet(part_dir("embed", part) / "metadata" / "metadata_0.parquet", columns=[KEY_COLUMN])
            row_of = pd.Series(np.arange(len(emb_meta)), index=emb_meta[KEY_COLUMN].astype(str))
            rows = row_of.loc[keys].to_numpy()
            frame = part_rows(part, keys)
            if images_wanted:  # (the samples laionbuild.read gives, written as they are)
                for sample in part_samples(part, frame):
                    writer.add(sample)
            else:
                writer.add(frame)
            for model, out in embeddings.items():
                arrays = {k: np.load(embed_dir(part, model) / k / f"{k}_0.npy", mmap_mode="r")[rows] for k in out.kinds}
                out.add(arrays, frame.drop(columns=["part"]))
        writer.close()
        if images_wanted:
            writer.write_index(cfg.recipe.name)
        for out in embeddings.values():
            out.close()
        if not embeddings[None].rows:
            raise InputError("no sample is selected: loosen `select` or check the funnel "
                               "(data/selected/stats.json)")
        models = {read_json(part_dir("embed", p) / "model.json")["architecture"] for p in cfg.subset.parts}
        untrained = any(read_json(part_dir("embed", p) / "model.json")["untrained"] for p in cfg.subset.parts)
        (emb_out / "README.txt").write_text(
            f"Embeddings of data/dataset, rows in dataset order. Model: {', '.join(sorted(models))}."
            + (" UNTRAINED weights (embed.pretrained=random): not meaningful.\n" if untrained else "\n")
            + "".join(f"models/{name}/: the same rows embedded by {spec.model} ({spec.pretrained}).\n"
                      for name, spec in cfg.embed.extra_models.items()))

