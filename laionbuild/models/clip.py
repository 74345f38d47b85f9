"""Resolve `embed.model` + `embed.pretrained` into a model clip-retrieval can load.

- an open_clip pretrained tag (e.g. `laion2b_s34b_b79k`): downloaded by open_clip (needs internet);
- a local checkpoint path: loaded as is;
- `random`: seeded untrained weights, written once to `data/.work/models/` and loaded like a
  local checkpoint, so the same loading path runs offline. Outputs say they are untrained.

`laionbuild-tiny` (laionbuild/models/model_configs/) is a tiny open_clip architecture for tests.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from laionbuild.project.atomic import atomic_file
from laionbuild.project.files import memo_digest
from laionbuild.project.layout import WORK

log = logging.getLogger(__name__)
MODEL_CONFIGS = Path(__file__).parent / "model_configs"
UNTRAINED_BANNER = "!" * 78


@dataclass
class ResolvedModel:
    clip_model: str  # what clip-retrieval's load_clip takes: open_clip:ARCH/CHECKPOINT
    architecture: str
    pretrained: str
    checkpoint: str | None
    untrained: bool


def register_model_configs() -> None:
    import open_clip

    _register(open_clip)


def _register(open_clip) -> None:
    if "laionbuild-tiny" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIGS)


def register_model_configs_on_import() -> None:
    """Register laionbuild's model configs when (and if) open_clip is first imported in this
    process and the processes it forks: Spark's Python daemon calls this instead of importing
    open_clip (and torch) itself, so workers of tasks that never embed start without them."""
    if "open_clip" in sys.modules:
        register_model_configs()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "open_clip":
            return None
        sys.meta_path.remove(self)  # one import to watch; find the real spec without us
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register(module)

        spec.loader.exec_module = exec_module
        return spec


def _file_md5(path: Path) -> str:
    """A checkpoint's md5, remembered by path, size and mtime (hashing a ViT-L/14 checkpoint on
    every part costs seconds)."""
    return memo_digest(path, "md5")


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def checkpoint_path(pretrained: str) -> Path | None:
    """The local checkpoint `embed.pretrained` (or an extra model's) names, or None for an
    open_clip tag or `random`: what `resolve` loads as a file, without importing open_clip."""
    if pretrained == "random":
        return None
    local = Path(pretrained).expanduser()
    return local if local.suffix in CHECKPOINT_SUFFIXES or local.exists() else None


def random_checkpoint_path(architecture: str, seed: int) -> Path:
    """Where `embed.pretrained=random` weights are written, relative to the project root."""
    return WORK / "models" / f"{architecture}-random-seed{seed}.pt"


def clip_retrieval_model(spec) -> str:
    """What clip-retrieval (`clip-retrieval back`, all_clip.load_clip) takes for an `embed`
    model spec (model, pretrained, seed): `open_clip:ARCH/TAG`, or `open_clip:ARCH/CHECKPOINT`
    with a relative path (from the project root) for `random` weights."""
    pretrained = str(random_checkpoint_path(spec.model, spec.seed)) if spec.pretrained == "random" else spec.pretrained
    return f"open_clip:{spec.model}/{pretrained}"


def random_checkpoint(architecture: str, seed: int) -> Path:
    import open_clip
    import torch

    path = random_checkpoint_path(architecture, seed).resolve()
    if not path.exists():
        torch.manual_seed(seed)
        model = open_clip.create_model(architecture, pretrained=None)
        with atomic_file(path) as tmp:
            torch.save(model.state_dict(), tmp)
    return path


def resolve(embed_cfg) -> ResolvedModel:
    import open_clip

    register_model_configs()
    architecture = embed_cfg.model
    if architecture not in open_clip.list_models():
        raise ValueError(f"embed.model: `{architecture}` is not an open_clip architecture "
                         f"(open_clip.list_models() has e.g. ViT-B-32, ViT-L-14, laionbuild-tiny)")
    pretrained = embed_cfg.pretrained
    if pretrained == "random":
        checkpoint = random_checkpoint(architecture, embed_cfg.seed)
        log.warning("\n%s\nembed.pretrained=random: UNTRAINED %s weights (seed %d). Embeddings, CLIP similarities\n"
                    "and the index are NOT meaningful. Use a pretrained tag or checkpoint for real builds.\n%s",
                    UNTRAINED_BANNER, architecture, embed_cfg.seed, UNTRAINED_BANNER)
        return ResolvedModel(f"open_clip:{architecture}/{checkpoint}", architecture, "random", str(checkpoint), True)
    local = checkpoint_path(pretrained)
    if local is not None:
        if not local.exists():
            raise FileNotFoundError(f"embed.pretrained: checkpoint {local} does not exist")
        local = local.resolve()
        return ResolvedModel(f"open_clip:{architecture}/{local}", architecture, str(local), str(local), False)
    tags = [tag for arch, tag in open_clip.list_pretrained() if arch == architecture]
    if pretrained not in tags:
        raise ValueError(f"embed.pretrained: `{pretrained}` is neither `random`, a checkpoint file, nor an "
                         f"open_clip pretrained tag of {architecture} (tags: {tags})")
    return ResolvedModel(f"open_clip:{architecture}/{pretrained}", architecture, pretrained, None, False)


def describe(model: ResolvedModel) -> dict:
    info = {"architecture": model.architecture, "pretrained": model.pretrained, "untrained": model.untrained}
    if model.checkpoint:
        info["checkpoint_md5"] = _file_md5(Path(model.checkpoint))
    if model.untrained:
        info["warning"] = "UNTRAINED weights (embed.pretrained=random): embeddings are not meaningful"
    return info
