"""Where a composed value came from: the command-line override that set it, or the last recipe
or group file (in Hydra's defaults order) that sets it, so an error can name it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

Origin = Callable[[str], Optional[str]]


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def defaults_files(conf_dirs: Sequence[Path], config_name: str, overrides: Sequence[str]) -> List[Tuple[Path, str]]:
    """(file, package) of every config of the recipe in merge order (later files win), each
    found in the first of `conf_dirs` (Hydra's search path order) that has it. Call it inside
    Hydra's initialize_config_dir."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    loader = GlobalHydra.instance().config_loader()
    defaults = loader.compute_defaults_list(config_name, list(overrides), RunMode.RUN).defaults
    files = []
    for d in defaults:
        found = [c / f"{d.config_path}.yaml" for c in conf_dirs if d.config_path and (c / f"{d.config_path}.yaml").is_file()]
        if found:
            files.append((found[0], d.package or ""))
    return files


def _depth_in(data: Any, path: List[str]) -> int:
    """How many leading elements of `path` the nested mapping `data` has."""
    depth = 0
    for name in path:
        if not isinstance(data, dict) or name not in data:
            break
        data, depth = data[name], depth + 1
    return depth


def _shown(path: Path) -> str:
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


def composed_origin(overrides: Sequence[str], files: Sequence[Tuple[Path, str]], conf_dirs: Sequence[Path]) -> Origin:
    import yaml

    def origin(key: str) -> Optional[str]:
        for override in reversed(list(overrides)):
            name = override_key(override)
            if any((c / name).is_dir() for c in conf_dirs):  # a group choice: the group's file says more
                continue
            if key == name or key.startswith(f"{name}.") or name.startswith(f"{key}."):
                return f"override `{override}`"
        best = None
        for path, package in files:
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            prefix = package.split(".") if package else []
            wanted = key.split(".")
            if wanted[:len(prefix)] != prefix:
                continue
            if _depth_in(data, wanted[len(prefix):]) == len(wanted) - len(prefix):
                best = path  # the last file setting the key wins
        return _shown(best) if best else None

    return origin
