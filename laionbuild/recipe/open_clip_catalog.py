"""What open_clip can build, read without importing it (importing open_clip imports torch:
seconds per compose, and the download stage runs without torch).

Architectures are open_clip's model config files plus ours (laionbuild/models/model_configs/), as
`open_clip.list_models()` finds them; pretrained tags are read from the `_PRETRAINED` table of
open_clip/pretrained.py. Where that file no longer parses as expected, open_clip is imported."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

OURS = Path(__file__).resolve().parents[1] / "models" / "model_configs"
LOCAL_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _package_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def _configs() -> Dict[str, dict]:
    folders = [OURS]
    package = _package_dir()
    if package is not None:
        folders.append(package / "model_configs")
    configs: Dict[str, dict] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            config = json.loads(path.read_text())
            if all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
                configs.setdefault(path.stem, config)
    return configs


def architectures() -> List[str]:
    return list(_configs())


def embed_dim(model: str) -> Optional[int]:
    """The width of an architecture's embeddings (its config's `embed_dim`), None if unknown."""
    return _configs().get(model, {}).get("embed_dim")


def _tags_of_call(node: ast.AST) -> Optional[Dict[str, bool]]:
    """`dict(tag=_pcfg(..., quick_gelu=True), ...)` -> {tag: quick_gelu}."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"):
        return None
    tags = {}
    for keyword in node.keywords:
        quick = any(k.arg == "quick_gelu" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in getattr(keyword.value, "keywords", []))
        tags[keyword.arg] = quick
    return tags


def _parse_pretrained(source: str) -> Dict[str, List[str]]:
    tables: Dict[str, Dict[str, bool]] = {}
    pretrained: Dict[str, Dict[str, bool]] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if (tags := _tags_of_call(node.value)) is not None:
            tables[name] = tags
        elif name == "_PRETRAINED" and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                tags = tables.get(value.id) if isinstance(value, ast.Name) else _tags_of_call(value)
                if tags is None:
                    raise ValueError(f"unexpected _PRETRAINED entry {ast.dump(value)[:80]}")
                pretrained[key.value] = tags
    if not pretrained:
        raise ValueError("no _PRETRAINED table")
    result = {model: list(tags) for model, tags in pretrained.items()}
    for model, tags in pretrained.items():  # open_clip adds MODEL-quickgelu entries for these
        if quick := [tag for tag, is_quick in tags.items() if is_quick]:
            result[f"{model}-quickgelu"] = quick
    return result


@lru_cache(maxsize=1)
def pretrained_tags() -> Dict[str, List[str]]:
    package = _package_dir()
    try:
        return _parse_pretrained((package / "pretrained.py").read_text())
    except (OSError, TypeError, ValueError, SyntaxError, AttributeError):
        import open_clip

        result: Dict[str, List[str]] = {}
        for model, tag in open_clip.list_pretrained():
            result.setdefault(model, []).append(tag)
        return result


COMMON = ("ViT-B-32", "ViT-L-14", "openai", "laion2b_s34b_b79k", "laionbuild-tiny")


def _suggest(value: str, choices: List[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=3, cutoff=0.5)
    examples = [c for c in COMMON if c in choices] or choices[:4]
    return f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(examples)}"


def model_problem(model: str) -> Optional[str]:
    if not model:
        return "must name an open_clip architecture (e.g. ViT-B-32)"
    if model in architectures():
        return None
    return f"not an open_clip architecture ({len(architectures())} known; {_suggest(model, architectures())})"


def pretrained_problem(model: str, pretrained: str) -> Optional[str]:
    """None when `pretrained` is `random`, an existing checkpoint file or a tag of `model`."""
    if not pretrained:
        return "must be set: a pretrained tag, a checkpoint file or `random`"
    tags = pretrained_tags().get(model, [])
    if pretrained == "random" or pretrained in tags:
        return None
    local = Path(pretrained).expanduser()
    if local.is_file():
        return None
    if local.suffix in LOCAL_SUFFIXES or "/" in pretrained or local.exists():
        return f"checkpoint file {local} does not exist" + (" (it is a folder)" if local.is_dir() else "")
    known = f"{len(tags)} tags of {model}; {_suggest(pretrained, tags)}" if tags else \
        f"open_clip has no pretrained tags for {model}"
    return f"neither `random`, a checkpoint file nor a pretrained tag ({known})"
