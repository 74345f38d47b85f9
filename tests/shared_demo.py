"""One demo build shared by the report, search page, progress and projector tests (built once
per test session, the first time one of them asks, by whichever pytest-xdist worker asks first;
the others wait for it and read the same project): two parts, Haar face tags, a metadata filter
on aspect ratio, built with `--progress`. Tests only read it; a test that changes a project
works on a copy (`copy_of`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from filelock import FileLock

from .conftest import FAST, Project, Result, new_project, session_root

EXTRA = ["tag.faces.detector=opencv_haar", "prepare.max_aspect_ratio=3.5"]
RECIPE = ["subset.parts=[0,1]", *EXTRA]
OVERRIDES = [*FAST, *RECIPE]
_built: dict[str, tuple[Project, Result]] = {}


def shared_demo(tmp_path_factory) -> tuple[Project, Result]:
    """(the built project, the output of its `laionbuild build --progress`)."""
    if "demo" not in _built:
        root = session_root(tmp_path_factory)
        record = root / "shared_demo.json"
        with FileLock(str(root / "shared_demo.lock")):
            if record.exists():
                saved = json.loads(record.read_text())
                project, result = Project(Path(saved["path"])), Result(saved["returncode"], saved["output"])
            else:
                project = new_project(root / "shared_demo" / "project", cache="own")  # copies take its cache along
                result = project.laionbuild("build", "--progress", *OVERRIDES)
                record.write_text(json.dumps({"path": str(project.path), "returncode": result.returncode,
                                              "output": result.output}))
        _built["demo"] = (project, result)
    return _built["demo"]


def copy_of(project: Project, target: Path) -> Project:
    """A full copy (git, DVC cache, workspace) of a built project."""
    shutil.copytree(project.path, target, symlinks=True)
    return Project(target)
