"""Run a process (and the processes it spawns) without importing torch.

img2dataset needs no torch, but `import img2dataset` imports webdataset, which imports torch
when it can (webdataset/pytorch.py falls back to stand-in classes on ModuleNotFoundError; so
do albumentations and the rest of img2dataset's imports). torch takes seconds of CPU to
import, and img2dataset's multiprocessing distributor *spawns* its logger and every worker, each
importing img2dataset again (what it saved: docs/benchmarks.md).

`enable()` makes `import torch` raise ModuleNotFoundError in this process (torch looks
uninstalled: `importlib.util.find_spec` says None) and sets
LAIONBUILD_WITHOUT_TORCH=pid:<its pid> for its children: a spawned child imports its parent's
main module (the `laionbuild` script, hence this package, whose `__init__` calls
`from_environment()`) before it unpickles its task, and refuses torch too if its parent is that
process (img2dataset's pool and logger are; nothing further down, nor a later stage that
inherits the variable somehow). Only for a process that runs one torch-free stage and exits
(`laionbuild stage download`): webdataset keeps its stand-ins for the life of the process.
LAIONBUILD_WITHOUT_TORCH=0 in the environment turns this off (should a later img2dataset or
webdataset need torch).
"""

from __future__ import annotations

import os
import sys

ENV = "LAIONBUILD_WITHOUT_TORCH"


def active() -> bool:
    return "torch" in sys.modules and sys.modules["torch"] is None


def _refuse() -> None:
    # None in sys.modules: `import torch` (and of any torch.*) raises ModuleNotFoundError, and
    # `importlib.util.find_spec("torch")` returns None, as if torch were not installed (pyspark
    # probes it that way when a SparkContext starts)
    sys.modules["torch"] = None


def enable() -> bool:
    """Refuse torch from now on, here and in child processes. False (nothing done) when torch
    is already imported (this process needs it) or LAIONBUILD_WITHOUT_TORCH=0."""
    if "torch" in sys.modules or os.environ.get(ENV) == "0":
        return active()
    os.environ[ENV] = f"pid:{os.getpid()}"
    _refuse()
    return True


def from_environment() -> None:
    if os.environ.get(ENV) == f"pid:{os.getppid()}" and "torch" not in sys.modules:
        _refuse()
