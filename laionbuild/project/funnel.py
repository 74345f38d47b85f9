"""Funnel counts. Every stage that keeps or drops rows records it through `Counts`, and the report
stage adds them up; the funnel is computed from these files, never hand-assembled."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Dict

from laionbuild.project.atomic import read_json, write_json
from laionbuild.project.layout import STATS_FILE
from laionbuild.recipe.errors import MissingInputError


class Counts:
    """Ordered named counts of one stage on one part (or of one global stage)."""

    def __init__(self) -> None:
        self.values: "OrderedDict[str, int]" = OrderedDict()
        self.failures: Dict[str, int] = {}

    def set(self, name: str, value: int) -> None:
        self.values[name] = int(value)

    def fail(self, reason: str, value: int) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + int(value)

    def save(self, directory: Path, **extra) -> None:
        data = {"counts": dict(self.values), "failures": dict(sorted(self.failures.items())), **extra}
        write_json(Path(directory) / STATS_FILE, data)


def load_stats(directory: Path) -> dict:
    path = Path(directory) / STATS_FILE
    if not path.exists():
        raise MissingInputError(f"{path}: missing; rebuild the stage that writes {directory}")
    return read_json(path)
