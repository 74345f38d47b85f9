"""laionbuild as a user installs it: the sdist and wheel `python -m build` makes (twine-checked),
the wheel installed with `--no-deps` into a folder outside the source tree and run from there
(this environment's dependencies, the wheel's laionbuild first on sys.path -- checked), `init`
and the demo build from the wheel's template; then a recipe of one's own, conf/recipe/mine.yaml
over the shipped groups, built with `laionbuild build` and through DVC's Hydra composition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from laionbuild.project.outputs import selected_keys

from .conftest import BIN, FAST, ROOT, Project, build_env
from .shared_demo import OVERRIDES, shared_demo

MINE = """\
# @package _global_
# The demo as the shared demo build sets it up, as a recipe of this repo's own: it extends the
# shipped recipe/demo.yaml (not copied here) and overrides three values.
defaults:
  - demo
  - _self_
recipe:
  name: mine
subset:
  parts: [0, 1]
prepare:
  max_aspect_ratio: 3.5
tag:
  faces:
    detector: opencv_haar
"""


class Installed(Project):
    """A project run with the installed wheel: its folder first on PYTHONPATH and PATH, no
    source tree on either."""

    def __init__(self, path: Path, site: Path):
        super().__init__(path)
        self.site = site

    def run(self, *args: str, check: bool = True, timeout: int = 900):
        env = build_env()
        env["PYTHONPATH"] = str(self.site)
        env["PATH"] = os.pathsep.join([str(self.site / "bin"), str(BIN), *[
            p for p in env["PATH"].split(os.pathsep) if p and not Path(p).resolve().is_relative_to(ROOT)]])
        proc = subprocess.run(list(args), cwd=self.path, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout)
        from .conftest import Result

        result = Result(proc.returncode, proc.stdout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
        return result

    def laionbuild(self, *args: str, check: bool = True):
        return self.run(str(self.site / "bin" / "laionbuild"), *args, check=check)


def keys_of(project) -> list[str]:
    selected = pq.ParquetFile(project / "data/selected/selected.parquet")
    return [k for part in (0, 1) for k in selected_keys(selected, part)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built (from the sdist) out of a copy of the source tree's files."""
    base = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    source = base / "src"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    # no build isolation: setuptools and wheel come from this environment, no registry needed
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(base / "dist"), str(source)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    dist = sorted((base / "dist").iterdir(), key=lambda p: p.suffix)
    assert [p.suffix for p in dist] == [".gz", ".whl"], dist  # the sdist, and the wheel built from it
    checked = subprocess.run([str(BIN / "twine"), "check", "--strict", *map(str, dist)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return dist[1]


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True)
    return site


def test_the_wheel_carries_the_template(site):
    template = site / "laionbuild" / "_template"
    for name in ("conf/config.yaml", "conf/recipe/laion400m.yaml", "conf/source/laion400m.yaml", "dvc.yaml",
                 ".dvcignore", ".gitignore", "demo/metadata/part-00000.parquet"):
        assert (template / name).is_file(), name
    shipped = sorted(p.name for p in (template / "conf/recipe").iterdir())
    assert shipped == sorted(p.name for p in (ROOT / "conf/recipe").iterdir())
    assert (site / "hydra_plugins/laionbuild_conf/__init__.py").is_file()
    assert (site / "bin/laionbuild").is_file()


@pytest.fixture(scope="module")
def repo(site, tmp_path_factory) -> Installed:
    base = tmp_path_factory.mktemp("installed")
    outside = Installed(base, site)
    where = outside.run(sys.executable, "-c", "import laionbuild, hydra_plugins.laionbuild_conf as p; "
                                              "print(laionbuild.__file__); print(p.__file__)").output.split()
    assert where == [str(site / "laionbuild/__init__.py"), str(site / "hydra_plugins/laionbuild_conf/__init__.py")]
    assert outside.run("sh", "-c", "command -v laionbuild").output.strip() == str(site / "bin/laionbuild")
    init = outside.laionbuild("init", str(base / "ds"))
    assert f"template: {site / 'laionbuild' / '_template'}" in init.output  # not the source tree's
    return Installed(base / "ds", site)


def test_init_writes_only_what_a_user_edits(repo):
    assert sorted(p.name for p in (repo / "conf").iterdir()) == ["config.yaml"]
    assert "laionbuild://conf" in (repo / "conf/config.yaml").read_text()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "demo/metadata", "params.yaml", "README.md"):
        assert (repo / name).exists(), name
    assert (repo / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()
    # composed from the wheel's conf/ through the search path: the checkout's demo recipe, key for key
    assert yaml.safe_load((repo / "params.yaml").read_text()) == yaml.safe_load((ROOT / "params.yaml").read_text())
    assert repo.run("git", "status", "--porcelain").output.strip() == ""


def test_the_installed_wheel_builds_the_demo_with_the_same_selected_keys(repo, tmp_path_factory):
    result = repo.laionbuild("build", *OVERRIDES)
    assert "Running stage 'index'" in result.output
    demo, demo_result = shared_demo(tmp_path_factory)
    assert demo_result.returncode == 0
    assert keys_of(repo) == keys_of(demo) and keys_of(repo)


def test_a_recipe_of_ones_own_builds_and_dvc_exp_run_composes_the_same(repo):
    (repo / "conf/recipe").mkdir()
    (repo / "conf/recipe/mine.yaml").write_text(MINE)
    before = keys_of(repo)
    result = repo.laionbuild("build", "recipe=mine", *FAST)
    assert yaml.safe_load((repo / "params.yaml").read_text())["recipe"]["name"] == "mine"
    # the same values as the demo build before it: only the stages that print the recipe's name rerun
    assert set(result.ran) <= {"report", "card"} and "report" in result.ran, result.ran
    assert keys_of(repo) == before
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-qm", "mine")

    threshold = "select.min_clip_similarity=0.02"
    overrides = ["recipe=mine", *FAST, threshold]
    repo.laionbuild("compose", *overrides, "--output", "expected.yaml")
    expected = yaml.safe_load((repo / "expected.yaml").read_text())
    (repo / "expected.yaml").unlink()
    run = repo.run(sys.executable, "-m", "dvc", "exp", "run", "-n", "mine-0.02", *[a for o in overrides for a in ("-S", o)])
    assert "Running stage 'select'" in run.output and "Running stage 'download@0'" not in run.output
    shown = json.loads(repo.run(sys.executable, "-m", "dvc", "exp", "show", "--json").output)
    params = next(rev["data"]["params"]["params.yaml"]["data"] for commit in shown for exp in commit.get("experiments") or []
                  for rev in exp.get("revs", []) if (rev["data"].get("name") or exp.get("name")) == "mine-0.02")
    assert params == expected  # DVC's Hydra composition: this repo's conf/ first, the shipped groups after
    assert params["select"]["min_clip_similarity"] == 0.02 and params["recipe"]["name"] == "mine"


def test_init_copy_conf_writes_a_frozen_copy_of_every_shipped_file(tmp_path):
    Project(tmp_path).laionbuild("init", "--copy-conf", str(tmp_path / "ds"))
    copied = sorted(str(p.relative_to(tmp_path / "ds" / "conf")) for p in (tmp_path / "ds/conf").rglob("*.yaml"))
    assert copied == sorted(str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml"))
    assert "laionbuild://" not in (tmp_path / "ds/conf/config.yaml").read_text()  # nothing searched outside it
    assert yaml.safe_load((tmp_path / "ds/params.yaml").read_text()) == yaml.safe_load((ROOT / "params.yaml").read_text())
