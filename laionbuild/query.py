"""`laionbuild query --text "..." | --image PATH [-k 10]`: the nearest selected samples of a
build. The query is embedded with the model whose embeddings the index holds (`index.model`:
an `embed.extra_models` entry, else `embed.model` + `embed.pretrained`,
loaded as clip-retrieval loads it, so a query image gets the embedding the build gave it),
normalised, and searched in the build's index (`data/index/image.index`, inner product);
rows map to `data/embeddings/metadata` (url, caption, key)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .layout import EMBEDDINGS, INDEX
from .models import resolve


def encode(cfg, text: str | None = None, image: str | None = None) -> np.ndarray:
    """(1, D) normalised float32 embedding of a text or an image file."""
    import torch
    from all_clip.main import load_clip_without_warmup
    from PIL import Image

    model_ref = resolve(cfg.embed.extra_models[cfg.index.model] if cfg.index.model else cfg.embed)
    device = "cuda" if cfg.embed.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if cfg.embed.device.startswith("cuda:"):
        device = cfg.embed.device
    model, preprocess, tokenizer = load_clip_without_warmup(model_ref.clip_model, False, device, None)
    with torch.no_grad():
        if text is not None:
            emb = model.encode_text(tokenizer([text]).to(device))
        else:
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"--image: {path} does not exist")
            emb = model.encode_image(preprocess(Image.open(path).convert("RGB")).unsqueeze(0).to(device))
    emb = emb.float().cpu().numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def metadata() -> pd.DataFrame:
    files = sorted((EMBEDDINGS / "metadata").glob("metadata_*.parquet"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not files:
        raise FileNotFoundError(f"{EMBEDDINGS / 'metadata'}: no build to query; run `laionbuild build` first")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def search(query: np.ndarray, k: int) -> list[dict]:
    import faiss

    path = INDEX / "image.index"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no index to query; run `laionbuild build` first")
    index = faiss.read_index(str(path))
    if query.shape[1] != index.d:
        raise ValueError(f"the query embedding has {query.shape[1]} dimensions, the index {index.d}: "
                         "params.yaml's embed model is not the one the index was built with")
    scores, rows = index.search(np.ascontiguousarray(query, dtype=np.float32), min(k, index.ntotal))
    meta = metadata()
    return [{"score": float(s), "key": str(meta.at[r, "key"]), "url": meta.at[r, "url"],
             "caption": meta.at[r, "caption"]} for s, r in zip(scores[0], rows[0]) if r >= 0]
