"""One module per stage. Each exposes `run(cfg, part)` (per-part stages) or `run(cfg)` (global
stages): a plain function of its inputs, its param section and its outputs, so the DVC command,
a test and an engine's executor all call it the same way."""

from __future__ import annotations

import importlib

from laionbuild.project.layout import GLOBAL_STAGES, PER_PART_STAGES, SPLIT_STAGES
from laionbuild.recipe.errors import InputError

# stage name -> module, where the stage's name would shadow the standard library
MODULES = {"select": "selection"}


def run_stage(name: str, cfg, part: int | None = None) -> None:
    if name not in PER_PART_STAGES + GLOBAL_STAGES + SPLIT_STAGES:
        raise InputError(f"unknown stage `{name}`; stages: {', '.join(PER_PART_STAGES + GLOBAL_STAGES + SPLIT_STAGES)}")
    module = importlib.import_module(f"laionbuild.stages.{MODULES.get(name, name)}")
    if name in PER_PART_STAGES:
        if part is None:
            raise InputError(f"stage `{name}` runs per part: pass --part N")
        if part not in cfg.subset.parts:
            raise InputError(f"part {part} is not in subset.parts {list(cfg.subset.parts)}")
        module.run(cfg, part)
    else:
        if part is not None:
            raise InputError(f"stage `{name}` is global: it takes no --part")
        module.run(cfg)
