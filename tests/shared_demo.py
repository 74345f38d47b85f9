"""One demo build shared by the report, search page, progress and projector tests (built once
per test session, the first time one of them asks): two parts, Haar face tags, a metadata
filter on aspect ratio, built with `--progress`. Tests only read it; a test that changes a
project works on a copy (`copy_of`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from .conftest import FAST, Project, Result, new_project

EXTRA = ["tag.faces.detector=opencv_haar", "prepare.max_aspect_ratio=3.5"]
RECIPE = ["subset.parts=[0,1]", *EXTRA]
OVERRIDES = [*FAST, *RECIPE]
_built: dict[str, tuple[Project, Result]] = {}


def shared_demo(tmp_path_factory) -> tuple[Project, Result]:
    """(the built project, the output of its `laionbuild build --progress`)."""
    if "demo" not in _built:
        project = new_project(tmp_path_factory.mktemp("shared_demo") / "project")
        result = project.laionbuild("build", "--progress", *OVERRIDES)
        _built["demo"] = (project, result)
    return _built["demo"]


def copy_of(project: Project, target: Path) -> Project:
    """A full copy (git, DVC cache, workspace) of a built project."""
    shutil.copytree(project.path, target, symlinks=True)
    return Project(target)
