"""`embed.text_model`: a text encoder that is not the image model's, paired with `embed.model`'s
image tower (LAION-5B's multilingual splits: CLIP ViT-B/32 images, multilingual text encoders
distilled into its embedding space). A local folder, loaded offline, of one of two kinds:

- `sentence_transformers`: a sentence-transformers model (`modules.json`: Transformer, Pooling,
  Dense), e.g. `sentence-transformers/clip-ViT-B-32-multilingual-v1`. clip-retrieval's own
  `use_mclip` path (`SentenceTransformer(folder).encode`) embeds the captions, locally and on Spark.
- `mclip`: an M-CLIP model (`config.json` with `model_type: M-CLIP`, the `multilingual_clip`
  package), e.g. `M-CLIP/XLM-Roberta-Large-Vit-B-32`. Its base transformer (`modelBase`) must
  load offline too: a local folder or one in the Hugging Face cache. Local engine only.

The folder is read here without importing torch (compose checks the embedding width: the
sentence-transformers modules' or M-CLIP's `numDims`), and fingerprinted file by file by the
`inputs` stage (data/inputs/models.json), so a changed weight file re-embeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

KINDS = ("sentence_transformers", "mclip")
POOLING_MODES = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                 "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


class TextModelError(ValueError):
    """What is wrong with an `embed.text_model` folder, in one line."""


def _json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TextModelError(f"{path}: cannot read it as JSON ({exc})") from None


def folder(text_model: str) -> Path:
    return Path(text_model).expanduser()


def kind(text_model: str) -> str:
    """`sentence_transformers` or `mclip`, from the folder's files."""
    path = folder(text_model)
    if not path.is_dir():
        raise TextModelError(f"{path}: no such folder (a local sentence-transformers or M-CLIP model folder; "
                             "download one first, e.g. `huggingface-cli download "
                             "sentence-transformers/clip-ViT-B-32-multilingual-v1 --local-dir DIR`)")
    if (path / "modules.json").is_file():
        return "sentence_transformers"
    config = path / "config.json"
    if config.is_file() and _json(config).get("model_type") == "M-CLIP":
        return "mclip"
    raise TextModelError(f"{path}: neither a sentence-transformers model (no modules.json) nor an M-CLIP model "
                         "(no config.json with model_type M-CLIP)")


def dim(text_model: str) -> int:
    """The width of the embeddings the model writes, read from its configuration files."""
    path = folder(text_model)
    if kind(text_model) == "mclip":
        config = _json(path / "config.json")
        if not isinstance(config.get("numDims"), int):
            raise TextModelError(f"{path / 'config.json'}: no integer `numDims` (M-CLIP's output width)")
        return config["numDims"]
    width = None
    for module in _json(path / "modules.json"):
        where = path / module.get("path", "")
        name = module.get("type", "")
        if name.endswith("Pooling"):
            config = _json(where / "config.json")
            modes = sum(bool(config.get(m)) for m in POOLING_MODES) or 1
            width = int(config["word_embedding_dimension"]) * modes
        elif name.endswith("Dense"):
            width = int(_json(where / "config.json")["out_features"])
    if width is None:
        raise TextModelError(f"{path / 'modules.json'}: no Pooling or Dense module to read the embedding width from")
    return width


def files(text_model: str) -> list[str]:
    """Every file of the model folder, sorted: what its fingerprint covers."""
    path = folder(text_model)
    if not path.is_dir():
        return []
    return sorted(str(p) for p in path.rglob("*") if p.is_file())


def describe(text_model: str) -> dict:
    """What model.json and the card say of the text encoder: folder, kind, width, and a digest
    of its files' md5s (names and contents)."""
    import hashlib

    from laionbuild.project.files import memo_digest

    path = folder(text_model).resolve()
    digest = hashlib.md5()
    for name in files(str(path)):
        digest.update(f"{Path(name).relative_to(path)}\0{memo_digest(Path(name))}\n".encode())
    return {"path": str(path), "kind": kind(str(path)), "dim": dim(str(path)), "files_md5": digest.hexdigest()}


def mclip_encoder(text_model: str) -> Callable[[list[str]], np.ndarray]:
    """An M-CLIP model as `captions -> float32 embeddings` (what clip-retrieval's ClipMapper
    calls as its `model_txt` when `use_mclip` is on)."""
    import torch
    import transformers
    from multilingual_clip import pt_multilingual_clip

    path = str(folder(text_model).resolve())
    try:
        model = pt_multilingual_clip.MultilingualCLIP.from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise TextModelError(f"{path}: cannot load the M-CLIP model offline ({str(exc).splitlines()[0]}); its "
                             "config.json `modelBase` must be a local folder or in the Hugging Face cache") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()

    def encode(captions: list[str]) -> np.ndarray:
        with torch.no_grad():
            tokens = tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt").to(device)
            embs = model.transformer(**tokens)[0]
            mask = tokens["attention_mask"]
            embs = (embs * mask.unsqueeze(2)).sum(dim=1) / mask.sum(dim=1)[:, None]  # MultilingualCLIP.forward
            return model.LinearTransformation(embs).float().cpu().numpy()

    return encode


def encoder(text_model: str, device: str | None = None) -> Callable[[list[str]], np.ndarray]:
    """Either kind as `captions -> float32 embeddings` (not normalised), loaded as embed loads it
    (a query embedded like the build's captions)."""
    if kind(text_model) == "mclip":
        return mclip_encoder(text_model)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder(text_model).resolve()), device=device)
    return lambda captions: model.encode(list(captions), show_progress_bar=False)
