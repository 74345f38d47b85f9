"""Shared fixtures: real projects (git + DVC) in tmp dirs, built with the real CLI."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from laionbuild.environment import patched
from laionbuild.project.layout import PER_PART_STAGES
from laionbuild.project.sweeps import copy_template

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Tiny model (seeded random weights: it has no pretrained tags, which compose checks) and one
# download process: the same code paths, in seconds instead of minutes.
FAST = ["embed.model=laionbuild-tiny", "embed.pretrained=random", "embed.batch_size=16", "download.processes_count=1"]
PROJECT_FILES = ["conf", "dvc.yaml", "demo", ".dvcignore", ".gitignore"]


def build_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", PYSPARK_PYTHON=sys.executable,
               DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return env


# DVC's (and the per-kind graph's) lines for a stage whose command ran, and for one restored from
# the run-cache
_RAN = r"Running stage '([^']+)'|running part stage '([^']+)'"
_RESTORED = r"Stage '([^']+)' is cached - skipping run"


@dataclass
class Result:
    returncode: int
    output: str

    @property
    def ran(self) -> list[str]:
        """Stages DVC found changed, in the order it took them: those it ran and those it restored
        from its run-cache (the outputs an earlier run of the same command, deps and params made:
        the test session's projects share one DVC cache, `SHARED_CACHE`, so a stage another test
        already ran is restored), less `inputs`: that one runs on every build by design (it only
        checks the files stages read; `checked`), so a no-op rebuild has `ran == []`.
        tests/test_file_inputs.py checks that it runs every time and stays cheap. `executed`:
        only those it ran."""
        return self._stages(f"{_RAN}|{_RESTORED}")

    @property
    def executed(self) -> list[str]:
        """Stages whose command DVC ran (not restored from its run-cache), less `inputs`."""
        return self._stages(_RAN)

    def _stages(self, pattern: str) -> list[str]:
        names = ["".join(groups) for groups in re.findall(pattern, self.output)]
        # (the per-kind graph: a kind's own stage is not work; the parts it runs are, by name)
        return [name for name in names if name != "inputs" and name not in PER_PART_STAGES]

    @property
    def checked(self) -> bool:
        """Whether the build ran the `inputs` check."""
        return "Running stage 'inputs'" in self.output

    @property
    def restored(self) -> list[str]:
        return re.findall(_RESTORED, self.output)


class Project:
    def __init__(self, path: Path):
        self.path = path

    def run(self, *args: str, check: bool = True, timeout: int = 900) -> Result:
        proc = subprocess.run(list(args), cwd=self.path, env=build_env(), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout)
        result = Result(proc.returncode, proc.stdout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
        return result

    def laionbuild(self, *args: str, check: bool = True) -> Result:
        return self.run(str(BIN / "laionbuild"), *args, check=check)

    def build(self, *overrides: str, check: bool = True) -> Result:
        return self.laionbuild("build", *FAST, *overrides, check=check)

    def status(self) -> dict[str, str]:
        """`laionbuild status` as {stage: built|stale|missing}."""
        return {stage: state for stage, (state, _) in self.status_reasons().items()}

    def status_reasons(self) -> dict[str, tuple[str, str]]:
        """`laionbuild status` as {stage: (built|stale|missing, why: `file: ...`, `params: ...`)}."""
        output = self.laionbuild("status").output
        rows = re.findall(r"^(\S+)\s+(built|stale|missing)(?: \((.*)\))?$", output, flags=re.M)
        return {stage: (state, why) for stage, state, why in rows}

    def build_in_process(self, *overrides: str, until: str | None = None) -> None:
        """Compose the recipe (with the real CLI), then run every stage in pipeline order in this
        process, as `dvc repro` would run their commands: for `engine=spark` builds on the test
        session's one SparkSession (`engine.master=active`, the `shared_spark` fixture) instead of a JVM
        per stage process. No DVC (nothing to compare in dvc.lock). `until`: the last stage run."""
        from laionbuild.project.layout import PER_PART_STAGES, STAGES
        from laionbuild.recipe.schema import load_params
        from laionbuild.stages import run_stage

        self.laionbuild("compose", *FAST, *overrides)
        old, saved = os.getcwd(), dict(os.environ)
        os.chdir(self.path)
        os.environ.update(build_env())
        try:
            cfg = load_params("params.yaml")
            for stage in STAGES:
                for part in (cfg.subset.parts if stage in PER_PART_STAGES else [None]):
                    run_stage(stage, cfg, part)
                if stage == until:
                    break
        finally:
            os.chdir(old)
            os.environ.clear()
            os.environ.update(saved)

    def dvc(self, *args: str, check: bool = True) -> Result:
        return self.run(sys.executable, "-m", "dvc", *args, check=check)

    def __truediv__(self, other: str) -> Path:
        return self.path / other


def session_root(tmp_path_factory) -> Path:
    """The test session's one temp folder, shared by its pytest-xdist workers (each worker has its
    own basetemp inside it)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


# The test session's one DVC cache, which every project `new_project` makes uses unless told
# otherwise (set by the `shared_dvc_cache` fixture): a stage that another test already ran with the
# same command, deps and params is restored from DVC's run-cache instead of recomputed, as in a
# user's sweeps. Per session only: the run-cache does not know our code, so it must not outlive it.
SHARED_CACHE: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def shared_dvc_cache(tmp_path_factory) -> Path:
    SHARED_CACHE[:] = [session_root(tmp_path_factory) / "dvc-cache"]
    SHARED_CACHE[0].mkdir(exist_ok=True)
    return SHARED_CACHE[0]


def new_project(path: Path, cache: str = "shared") -> Project:
    """A git + DVC repo holding the shipped recipe files. `cache`: "shared" (the session's DVC
    cache, `SHARED_CACHE`) or "own" (its own .dvc/cache: for a test that compares two builds,
    kills one, or counts or deletes cache objects, where a restore from another test's run would
    make it pass without checking anything)."""
    if cache not in ("shared", "own"):
        raise ValueError(f"new_project: cache={cache!r}: 'shared' or 'own'")
    copy_template(ROOT, path, PROJECT_FILES)
    project = Project(path)
    project.run("git", "init", "-q")
    project.dvc("init", "-q")
    if cache == "shared" and SHARED_CACHE:
        # (.dvc/config.local: not committed, as `dvc cache dir --local` writes it)
        (path / ".dvc/config.local").write_text(f"[cache]\n    dir = {SHARED_CACHE[0]}\n")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "init")
    return project


@pytest.fixture(scope="session")
def shared_spark():
    """The test session's one SparkSession (local[2], configured as `engine=spark` configures its
    own), for builds run in-process with `engine.master=active` (`Project.build_in_process`)."""
    from types import SimpleNamespace

    from laionbuild.engine.spark import spark_session

    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = spark_session(SimpleNamespace(master="local[2]", driver_memory="2g", shuffle_partitions=8, conf={}))
    yield session
    session.stop()


S3_BUCKET = "laionbuild-shards"


@contextmanager
def environment(**values):
    with patched(values):
        yield


@pytest.fixture(scope="session")
def s3():
    """A real S3 server on 127.0.0.1 (moto's) with one versioned bucket (what a stage wrote and
    removed again can still be listed); its endpoint and credentials in the environment, which
    builds' subprocesses inherit. The endpoint is named `localhost`, so the download's polite
    proxy lets it through (no_proxy) while the demo's images on 127.0.0.1 still go through it.
    Yields (an s3fs filesystem, the environment variables)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    values = dict(AWS_ENDPOINT_URL=f"http://localhost:{port}", AWS_ACCESS_KEY_ID="test",
                  AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    try:
        with environment(**values):
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir(S3_BUCKET)
            fs.call_s3("put_bucket_versioning", Bucket=S3_BUCKET, VersioningConfiguration={"Status": "Enabled"})
            yield fs, values
    finally:
        server.stop()


def spark_jobs(session) -> int:
    """How many jobs the session has run (to tell that a build really ran on it)."""
    return len(session.sparkContext.statusTracker().getJobIdsForGroup())


@pytest.fixture
def project(tmp_path) -> Project:
    return new_project(tmp_path / "project")
