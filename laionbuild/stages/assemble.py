"""assemble: the final dataset of the selected samples, in build order (part order, then
key order):

- `data/dataset/NNNNN.tar` webdataset shards (`KEY.jpg`, `KEY.txt`, `KEY.json` with key, url,
  caption and tags) + `NNNNN.parquet` with the same metadata;
- `data/embeddings/{img_emb,text_emb,metadata}/` in clip-retrieval's layout, rows aligned with
  the shards.

Tar members get fixed owners and mtimes so the same inputs give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import tarfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ..atomic import atomic_dir, read_json
from ..layout import DATASET, EMBEDDINGS, SELECTED, part_dir
from .download import KEY_COLUMN, shard_files

TAG_COLUMNS_SKIP = {"key", "part"}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


@contextmanager
def downloaded_images(part: int):
    """key -> (image bytes loader, extension) over a part's img2dataset shards, which store
    samples in completion order, not input order."""
    with ExitStack() as stack:
        found: dict[str, tuple] = {}
        for shard in shard_files(part_dir("download", part)):
            tar = stack.enter_context(tarfile.open(shard))
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar.getmembers():
                stem, _, ext = member.name.partition(".")
                members.setdefault(stem, {})[ext] = member
            for files in members.values():
                image_ext = next((e for e in ("jpg", "png", "webp") if e in files), None)
                if image_ext is None or "json" not in files:
                    continue
                key = json.loads(tar.extractfile(files["json"]).read())[KEY_COLUMN]
                found[key] = (tar, files[image_ext], image_ext)
        yield found


class _ShardWriter:
    def __init__(self, out: Path, per_shard: int):
        self.out, self.per_shard = out, per_shard
        self.shard, self.count, self.tar, self.rows = -1, 0, None, []

    def _roll(self) -> None:
        self.close()
        self.shard += 1
        self.tar = tarfile.open(self.out / f"{self.shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
        self.count, self.rows = 0, []

    def add(self, key: str, image: bytes, ext: str, caption: str, meta: dict) -> None:
        if self.tar is None or self.count >= self.per_shard:
            self._roll()
        _add(self.tar, f"{key}.{ext}", image)
        _add(self.tar, f"{key}.txt", caption.encode())
        _add(self.tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self.rows.append(meta)
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            frame = pd.DataFrame(self.rows)
            frame["shard"] = self.shard
            frame.drop(columns=["tags"]).join(pd.json_normalize(frame["tags"])).to_parquet(
                self.out / f"{self.shard:05d}.parquet", index=False)
            self.tar = None


def _write_embeddings(out: Path, img: np.ndarray, text: np.ndarray, meta: pd.DataFrame, per_file: int) -> None:
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir()
    for i, start in enumerate(range(0, max(len(meta), 1), per_file)):
        end = start + per_file
        np.save(out / "img_emb" / f"img_emb_{i}.npy", img[start:end])
        np.save(out / "text_emb" / f"text_emb_{i}.npy", text[start:end])
        meta.iloc[start:end].to_parquet(out / "metadata" / f"metadata_{i}.parquet", index=False)


def run(cfg) -> None:
    selected = pq.read_table(SELECTED / "selected.parquet").to_pandas()
    img_parts, text_parts, meta_rows = [], [], []
    with atomic_dir(DATASET) as dataset_out, atomic_dir(EMBEDDINGS) as emb_out:
        writer = _ShardWriter(dataset_out, cfg.assemble.samples_per_shard)
        for part in cfg.subset.parts:
            keys = selected.loc[selected["part"] == part, "key"].tolist()  # in build order
            if not keys:
                continue
            prepared = pq.read_table(part_dir("dedup", part) / "metadata.parquet").to_pandas().set_index("key")
            tags = pq.read_table(part_dir("tag", part) / "tags.parquet").to_pandas().set_index("key")
            embed_dir = part_dir("embed", part)
            emb_meta = pd.read_parquet(embed_dir / "metadata" / "metadata_0.parquet")
            row_of = {k: i for i, k in enumerate(emb_meta[KEY_COLUMN].astype(str))}
            img = np.load(embed_dir / "img_emb" / "img_emb_0.npy", mmap_mode="r")
            text = np.load(embed_dir / "text_emb" / "text_emb_0.npy", mmap_mode="r")
            rows = []
            with downloaded_images(part) as images:
                for key in keys:
                    tar, member, ext = images[key]
                    image = tar.extractfile(member).read()
                    source = prepared.loc[key]
                    tag_values = {c: _plain(v) for c, v in tags.loc[key].items() if c not in TAG_COLUMNS_SKIP}
                    meta = {"key": key, "part": part, "url": source["url"], "caption": source["caption"],
                            "tags": tag_values}
                    writer.add(key, image, ext, source["caption"], meta)
                    rows.append(row_of[key])
                    meta_rows.append({"key": key, "url": source["url"], "caption": source["caption"],
                                      **tag_values})
            img_parts.append(np.asarray(img[rows]))
            text_parts.append(np.asarray(text[rows]))
        writer.close()
        if not meta_rows:
            raise RuntimeError("no sample is selected: loosen `select` or check the funnel "
                               "(data/selected/stats.json)")
        _write_embeddings(emb_out, np.concatenate(img_parts), np.concatenate(text_parts),
                          pd.DataFrame(meta_rows), cfg.assemble.embeddings_per_file)
        models = {read_json(part_dir("embed", p) / "model.json")["architecture"] for p in cfg.subset.parts}
        untrained = any(read_json(part_dir("embed", p) / "model.json")["untrained"] for p in cfg.subset.parts)
        (emb_out / "README.txt").write_text(
            f"Embeddings of data/dataset, rows in dataset order. Model: {', '.join(sorted(models))}."
            + (" UNTRAINED weights (embed.pretrained=random): not meaningful.\n" if untrained else "\n"))


def _plain(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value
