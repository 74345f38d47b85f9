"""`laionbuild query --text "..." | --image PATH [-k 10]`: the nearest selected samples of a
build. The query is embedded with the model whose embeddings the index holds (`index.model`:
an `embed.extra_models` entry, else `embed.model` + `embed.pretrained`, and a text query by
`embed.text_model` where one is paired with it; loaded as clip-retrieval loads it, so a query
image gets the embedding the build gave it),
normalised, and searched in the build's index (`data/index/image.index`, inner product);
rows map to `data/embeddings/metadata` (url, caption, key, tags). `laionbuild serve` uses the
same `Encoder` and `BuildIndex`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from laionbuild.models.clip import resolve
from laionbuild.project.files import numbered
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


class BuildIndex:
    """A build's index (`data/index/image.index`), the metadata of its rows and their image
    embeddings (`data/embeddings/img_emb`, memory-mapped), loaded once."""

    def __init__(self):
        import faiss

        path = INDEX / "image.index"
        if not path.exists():
            raise MissingInputError(f"{path}: no index to query; run `laionbuild build` first")
        self.index = faiss.read_index(str(path))
        self.metadata = metadata()
        files = numbered(EMBEDDINGS / "img_emb", "img_emb", ".npy")
        self._embeddings = [np.load(f, mmap_mode="r") for f in files]
        self._starts = np.cumsum([0] + [len(e) for e in self._embeddings])
        if self._starts[-1] != len(self.metadata) or self.index.ntotal != len(self.metadata):
            raise InputError(f"{EMBEDDINGS}: {self._starts[-1]} embeddings and {len(self.metadata)} metadata rows, "
                             f"{path}: {self.index.ntotal} vectors; rebuild (`laionbuild build`)")

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the k nearest rows to one (1, D) query, best first."""
        if query.shape[1] != self.index.d:
            raise InputError(f"the query embedding has {query.shape[1]} dimensions, the index {self.index.d}: "
                             "params.yaml's embed model is not the one the index was built with")
        scores, rows = self.index.search(np.ascontiguousarray(query, dtype=np.float32), min(k, len(self)))
        keep = rows[0] >= 0
        return scores[0][keep], rows[0][keep]

    def embedding(self, row: int) -> np.ndarray:
        """The image embedding of one row, (D,) float32."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is not in the index (0..{len(self) - 1})")
        file = int(np.searchsorted(self._starts, row, side="right")) - 1
        return np.asarray(self._embeddings[file][row - self._starts[file]], dtype=np.float32)


def search(query: np.ndarray, k: int) -> list[dict]:
    index = BuildIndex()
    scores, rows = index.search(query, k)
    meta = index.metadata
    return [{"score": float(s), "key": str(meta.at[r, "key"]), "url": meta.at[r, "url"],
             "caption": meta.at[r, "caption"]} for s, r in zip(scores, rows)]
