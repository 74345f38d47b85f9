"""One module per stage. Each exposes `run(cfg, part)` (per-part stages) or `run(cfg)` (global
stages): a plain function of its inputs, its param section and its outputs, so the DVC command,
a test and an engine's executor all call it the same way."""

from __future__ import annotations

import importlib
from pathlib import Path

from laionbuild.project.layout import GLOBAL_STAGES, PER_PART_STAGES, SPLIT_STAGES
from laionbuild.recipe.errors import InputError

# stage name -> module, where the stage's name would shadow the standard library
MODULES = {"select": "selection"}


def run_stage(name: str, cfg, part: int | None = None, all_parts: bool = False,
              params_yaml: str = "params.yaml") -> None:
    """Run stage `name`: a per-part stage for `part`, or with `all_parts` for every part of
    subset.parts that is not up to date (the per-kind graph: project/partwise.py)."""
    if name not in PER_PART_STAGES + GLOBAL_STAGES + SPLIT_STAGES:
        raise InputError(f"unknown stage `{name}`; stages: {', '.join(PER_PART_STAGES + GLOBAL_STAGES + SPLIT_STAGES)}")
    module = importlib.import_module(f"laionbuild.stages.{MODULES.get(name, name)}")
    if name in PER_PART_STAGES and all_parts:
        from laionbuild.project.partwise import run_parts

        if part is not None:
            raise InputError(f"stage `{name}`: --part and --all-parts exclude each other")
        run_parts(name, cfg.subset.parts, lambda p: module.run(cfg, p), params_yaml=Path(params_yaml))
    elif name in PER_PART_STAGES:
        if part is None:
            raise InputError(f"stage `{name}` runs per part: pass --part N (or --all-parts)")
        if part not in cfg.subset.parts:
            raise InputError(f"part {part} is not in subset.parts {list(cfg.subset.parts)}")
        module.run(cfg, part)
    else:
        if part is not None or all_parts:
            raise InputError(f"stage `{name}` is global: it takes no --part or --all-parts")
        module.run(cfg)
