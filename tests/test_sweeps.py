"""Sweeps and versioned builds: `laionbuild init` scaffolds a dataset repo; `laionbuild build -m`
runs one DVC experiment per point of a Hydra multirun sweep, sharing every expensive stage;
`dvc exp run --queue -S` works through DVC's Hydra composition too."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import BIN, FAST, Project

POINT = [*FAST, "subset.parts=[0]"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Project:
    base = tmp_path_factory.mktemp("sweeps")
    Project(base).laionbuild("init", str(base / "ds"))
    return Project(base / "ds")


def experiments(project: Project) -> dict[str, dict]:
    """name -> {params, metrics} of every experiment (`dvc exp show --json`)."""
    shown = json.loads(project.dvc("exp", "show", "--json").output)
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data", {})
                found[data.get("name") or exp.get("name")] = {
                    "params": data.get("params", {}).get("params.yaml", {}).get("data", {}),
                    "metrics": data.get("metrics", {}).get("data/metrics/funnel.json", {}).get("data", {}),
                }
    return found


def test_init_scaffolds_a_dataset_repo(repo):
    assert sorted(p.name for p in (repo / "conf").iterdir()) == ["config.yaml"]  # the shipped conf/ is searched after it
    for name in ("conf/config.yaml", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore",
                 "demo/metadata", ".dvc/config", "README.md"):
        assert (repo / name).exists(), name
    assert "enabled = true" in (repo / ".dvc/config").read_text()  # DVC's Hydra composition
    assert repo.run("git", "status", "--porcelain").output.strip() == ""  # all committed
    assert len(repo.run("git", "log", "--oneline").output.strip().splitlines()) == 1
    result = Project(repo.path.parent).laionbuild("init", str(repo.path), check=False)
    assert result.returncode != 0 and "not empty" in result.output


def test_sweep_is_one_experiment_per_point_sharing_expensive_stages(repo):
    result = repo.laionbuild("build", "-m", *POINT, "select.min_clip_similarity=-0.1,0.0,0.02")
    assert result.ran.count("download@0") == 1 and result.ran.count("embed@0") == 1  # computed once
    assert result.ran.count("select") == 3
    exps = experiments(repo)
    names = ["min_clip_similarity=-0.1", "min_clip_similarity=0.0", "min_clip_similarity=0.02"]
    assert set(names) <= set(exps)
    selected = [exps[n]["metrics"]["selected"] for n in names]
    assert selected[0] >= selected[1] >= selected[2] and selected[0] > selected[2]
    assert [exps[n]["params"]["select"]["min_clip_similarity"] for n in names] == [-0.1, 0.0, 0.02]
    bad = repo.laionbuild("build", "-m", *POINT, "select.min_clip_similarity=0.1,7", check=False)
    assert bad.returncode != 0 and "select.min_clip_similarity" in bad.output  # validated before any run


def test_a_top_fraction_sweep_is_one_build_plus_a_selection_per_point(repo):
    """DataComp-style: five fractions of the build by a tag column, five experiments; the
    expensive stages run at most once (not at all where an earlier point built them)."""
    fractions = [0.1, 0.3, 0.5, 0.7, 0.9]
    result = repo.laionbuild("build", "-m", *POINT, f"+select.top_fraction.width={','.join(map(str, fractions))}")
    for stage in ("download@0", "embed@0", "tag@0", "clusters", "neardup"):
        assert result.ran.count(stage) <= 1, stage
    assert result.ran.count("select") == 5
    exps = experiments(repo)
    names = [f"width={f}" for f in fractions]
    assert set(names) <= set(exps), sorted(exps)
    selected = [exps[n]["metrics"]["selected"] for n in names]
    assert selected == sorted(selected) and selected[0] < selected[-1]


def test_dvc_queue_through_hydra_composition(repo):
    repo.dvc("exp", "run", "--queue", "-n", "queued", *[a for o in POINT for a in ("-S", o)],
             "-S", "select.min_clip_similarity=0.01")
    repo.dvc("queue", "start", "-j", "1")
    deadline = time.time() + 600
    while time.time() < deadline:
        status = repo.dvc("queue", "status").output
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    logs = repo.dvc("queue", "logs", "queued").output
    assert "Running stage 'select'" in logs and "Running stage 'download@0'" not in logs  # restored, not re-run
    exps = experiments(repo)
    assert exps["queued"]["params"]["select"]["min_clip_similarity"] == 0.01
    assert exps["queued"]["metrics"]["selected"] > 0
    assert str(BIN)  # the queue's workers ran this environment's laionbuild (PATH from build_env)


def test_dvc_plots_draw_the_funnel_per_experiment(repo):
    shown = json.loads(repo.dvc("plots", "show", "--json").output)
    text = json.dumps(shown)
    assert "funnel_steps.json" in text and '"step": "selected"' in text and '"step": "rows_in"' in text
    diff = repo.dvc("plots", "diff", "min_clip_similarity=-0.1", "min_clip_similarity=0.02", "--json").output
    assert "min_clip_similarity=-0.1" in diff and "min_clip_similarity=0.02" in diff


def _digest(root, rel: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((root / rel).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root / rel)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


OUTPUTS = ("raw", "prepared", "deduped", "images", "embed", "tags", "selected", "dataset", "embeddings", "index")


def test_push_then_pull_in_a_fresh_clone_is_byte_identical(repo, tmp_path):
    repo.dvc("exp", "apply", "min_clip_similarity=0.0")  # promote a point: its outputs into the workspace
    repo.dvc("remote", "add", "-d", "store", str(tmp_path / "store"))
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-qm", "build: min_clip_similarity=0.0")
    repo.dvc("push")
    repo.run("git", "clone", "-q", str(repo.path), str(tmp_path / "clone"))
    clone = Project(tmp_path / "clone")
    clone.dvc("pull")
    for rel in OUTPUTS:
        assert _digest(clone.path, f"data/{rel}") == _digest(repo.path, f"data/{rel}"), rel
    assert json.loads((clone / "data/metrics/funnel.json").read_text()) == \
        json.loads((repo / "data/metrics/funnel.json").read_text())  # in git
    # up to date but for the input check, which runs on every build (the fingerprints are in git)
    assert json.loads(clone.dvc("status", "--json").output) == {"inputs": ["always changed"]}
    assert set(clone.status().values()) == {"built"}


def test_the_same_recipe_built_in_two_fresh_repos_is_identical(repo, tmp_path):
    """`repo` holds the min_clip_similarity=0.0 point (previous test), its selection only (a sweep
    point): materialised, it is the plain build of its recipe from scratch."""
    import numpy as np

    repo.laionbuild("materialize")
    Project(tmp_path).laionbuild("init", str(tmp_path / "again"))
    again = Project(tmp_path / "again")
    again.build("subset.parts=[0]", "select.min_clip_similarity=0.0")
    for rel in ("raw", "prepared", "deduped", "selected", "dataset", "tags"):
        assert _digest(again.path, f"data/{rel}") == _digest(repo.path, f"data/{rel}"), rel
    for kind in ("img_emb", "text_emb"):
        a = np.load(again / f"data/embeddings/{kind}/{kind}_000000.npy")
        b = np.load(repo / f"data/embeddings/{kind}/{kind}_000000.npy")
        np.testing.assert_allclose(a, b, atol=1e-5)
