"""inputs: check every file the build's stages read from outside DVC's sight (source parts, the
id list, weights, checkpoints, the demo's served folder) and rewrite the fingerprint file
(`data/inputs/`) of each one that changed, so DVC reruns exactly the stages that read it. Runs
first on every build (`always_changed` in dvc.yaml); costs a stat per local file and a metadata
request per remote one (laionbuild/project/inputs.py)."""

from __future__ import annotations

import logging
import time

from laionbuild.project.inputs import write

log = logging.getLogger(__name__)


def run(cfg) -> None:
    began = time.perf_counter()
    changed, checked = write(cfg)
    log.info("inputs: %d files checked in %.2f s; changed: %s", checked, time.perf_counter() - began,
             ", ".join(changed) or "none")
