"""`laionbuild query --text "..." | --image PATH [-k 10]`: the nearest selected samples of a
build. The query is embedded with the model whose embeddings the index holds (`index.model`:
an `embed.extra_models` entry, else `embed.model` + `embed.pretrained`, and a text query by
`embed.text_model` where one is paired with it; loaded as clip-retrieval loads it, so a query
image gets the embedding the build gave it),
normalised, and searched in the build's index (`data/index/image.index`, inner product);
rows map to `data/embeddings/metadata` (url, caption, key, tags). `laionbuild serve` uses the
same `Encoder` and `BuildIndex`.

On an unmaterialised build (`assemble.materialize=false`, a sweep point) data/index indexes every
embedded sample; `BuildIndex` then searches it with the point's selection (data/selected) as a
faiss id filter (laionbuild/project/index_filter.py), so every result is a selected sample, and
holds the metadata of the selected rows only (keyed by their index id), read from
data/index/metadata, and their image embeddings from data/embed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from laionbuild.models.clip import resolve
from laionbuild.project.files import numbered
from laionbuild.project.index_filter import SelectionFilter, all_samples_index, embedding_files, selected_ids
from laionbuild.project.layout import EMBEDDINGS, INDEX
from laionbuild.recipe.errors import InputError, MissingInputError


class Encoder:
    """The index's model, loaded once: texts and images -> (1, D) normalised float32."""

    def __init__(self, cfg):
        import torch
        from all_clip.main import load_clip_without_warmup

        model_ref = resolve(cfg.embed.extra_models[cfg.index.model] if cfg.index.model else cfg.embed)
        device = "cuda" if cfg.embed.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        if cfg.embed.device.startswith("cuda:"):
            device = cfg.embed.device
        self.device = device
        self.model, self.preprocess, self.tokenizer = load_clip_without_warmup(model_ref.clip_model, False, device,
                                                                               None)
        # an index over embed.model's images paired with embed.text_model: a text query is
        # embedded by that text encoder, as the build's captions were
        self.text_model = None
        if not cfg.index.model and cfg.embed.text_model:
            from laionbuild.models.text_encoders import encoder

            self.text_model = encoder(cfg.embed.text_model, device)

    def text(self, text: str) -> np.ndarray:
        import torch

        if self.text_model is not None:
            emb = np.asarray(self.text_model([text]), np.float32)
            return emb / np.linalg.norm(emb, axis=1, keepdims=True)
        with torch.no_grad():
            return _normalised(self.model.encode_text(self.tokenizer([text]).to(self.device)))

    def image(self, image) -> np.ndarray:
        """`image`: a PIL image."""
        import torch

        with torch.no_grad():
            return _normalised(self.model.encode_image(self.preprocess(image.convert("RGB")).unsqueeze(0).to(self.device)))


def _normalised(emb) -> np.ndarray:
    emb = emb.float().cpu().numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def encode(cfg, text: str | None = None, image: str | None = None) -> np.ndarray:
    """(1, D) normalised float32 embedding of a text or an image file."""
    from PIL import Image

    if text is None:
        path = Path(image)
        if not path.is_file():
            raise MissingInputError(f"--image: {path} does not exist")
        with Image.open(path) as opened:
            return Encoder(cfg).image(opened)
    return Encoder(cfg).text(text)


def metadata() -> pd.DataFrame:
    files = numbered(EMBEDDINGS / "metadata", "metadata", ".parquet")
    if not files:
        raise MissingInputError(f"{EMBEDDINGS / 'metadata'}: no build to query; run `laionbuild build` first")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def selected_metadata(ids: np.ndarray) -> pd.DataFrame:
    """The rows of data/index/metadata (an all-samples index) at index ids `ids` (sorted), indexed
    by their id: one metadata file (a part) read at a time."""
    frames, start = [], 0
    for path in numbered(INDEX / "metadata", "metadata", ".parquet"):
        frame = pd.read_parquet(path)
        mine = ids[(ids >= start) & (ids < start + len(frame))]
        if len(mine):
            frames.append(frame.iloc[mine - start].set_axis(pd.Index(mine), axis=0))
        start += len(frame)
    return pd.concat(frames) if frames else pd.DataFrame({"key": [], "url": [], "caption": []})


class BuildIndex:
    """A build's index (`data/index/image.index`), the metadata of its rows and their image
    embeddings (`data/embeddings/img_emb`, memory-mapped), loaded once. `metadata` is indexed by
    index id; on an unmaterialised build it holds the selected rows only, and `filter` (the
    selection as faiss search parameters) applies to every search."""

    def __init__(self):
        import faiss

        path = INDEX / "image.index"
        if not path.exists():
            raise MissingInputError(f"{path}: no index to query; run `laionbuild build` first")
        self.index = faiss.read_index(str(path))
        self.filter: SelectionFilter | None = None
        if all_samples_index():
            ids = selected_ids()
            self.filter = SelectionFilter(self.index, ids)  # once per process: a bitmap of ntotal bits
            self.metadata = selected_metadata(ids)
            files, where = embedding_files("img_emb"), INDEX / "metadata"
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in numbered(where, "metadata", ".parquet"))
        else:
            self.metadata = metadata()
            files, rows, where = numbered(EMBEDDINGS / "img_emb", "img_emb", ".npy"), len(self.metadata), EMBEDDINGS
        self._embeddings = [np.load(f, mmap_mode="r") for f in files]
        self._starts = np.cumsum([0] + [len(e) for e in self._embeddings])
        if self._starts[-1] != rows or self.index.ntotal != rows:
            raise InputError(f"{where}: {self._starts[-1]} embeddings and {rows} metadata rows, "
                             f"{path}: {self.index.ntotal} vectors; rebuild (`laionbuild build`)")

    def __len__(self) -> int:
        """The rows a search can return (the selected ones of an all-samples index)."""
        return len(self.metadata) if self.filter is not None else int(self.index.ntotal)

    def __contains__(self, row: int) -> bool:
        """Whether index id `row` is a row of this build (selected, on an unmaterialised build)."""
        return (row in self.filter) if self.filter is not None else 0 <= row < self.index.ntotal

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the k nearest rows to one (1, D) query, best first."""
        if query.shape[1] != self.index.d:
            raise InputError(f"the query embedding has {query.shape[1]} dimensions, the index {self.index.d}: "
                             "params.yaml's embed model is not the one the index was built with")
        params = {"params": self.filter.params} if self.filter is not None else {}
        if not len(self):
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        scores, rows = self.index.search(np.ascontiguousarray(query, dtype=np.float32), min(k, len(self)), **params)
        keep = rows[0] >= 0
        return scores[0][keep], rows[0][keep]

    def embedding(self, row: int) -> np.ndarray:
        """The image embedding of one row, (D,) float32."""
        if row not in self:
            where = f"(0..{self.index.ntotal - 1})" if self.filter is None else "(not a selected sample)"
            raise IndexError(f"row {row} is not in the index {where}")
        file = int(np.searchsorted(self._starts, row, side="right")) - 1
        return np.asarray(self._embeddings[file][row - self._starts[file]], dtype=np.float32)


def search(query: np.ndarray, k: int) -> list[dict]:
    index = BuildIndex()
    scores, rows = index.search(query, k)
    meta = index.metadata
    return [{"score": float(s), "key": str(meta.at[r, "key"]), "url": meta.at[r, "url"],
             "caption": meta.at[r, "caption"]} for s, r in zip(scores, rows)]
