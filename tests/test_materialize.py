"""Sweep points are selections; `laionbuild materialize` builds the point kept (#22).

`laionbuild build -m` gives every point `assemble.materialize=false`: the points differ by their
selection and funnel only, the DVC cache grows by no image bytes per point, `dvc exp show` still
compares them by funnel metrics; `laionbuild.read` reads a point's samples before it is
materialised, and `dvc exp apply NAME && laionbuild materialize` gives byte for byte the
outputs of a plain build of the same recipe in another project."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from laionbuild.project.sweeps import materialized_params, with_sweep_defaults
from laionbuild.recipe.errors import RecipeError

from .shared_demo import OVERRIDES, copy_of, shared_demo
from .test_readers import _dataset_members
from .test_sweeps import experiments

DEFAULT_THRESHOLD = -0.05  # conf/recipe/demo.yaml's select.min_clip_similarity: the shared demo's point
EXPORTS = ["export.h5=true", "+export.tsv_columns.url=url", "+export.tsv_columns.caption=caption"]
MATERIALISED = ("dataset", "embeddings", "export", "index")
# image_infos.json keys that differ between two runs of autofaiss on the same vectors (a plain
# build twice too): its measured search speed and the temporary path it wrote the index at
AUTOFAISS_VOLATILE = {"index_path", "avg_search_speed_ms", "99p_search_speed_ms"}


def digests(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cache_objects(project) -> dict[str, int]:
    """DVC's cache, content objects only (not the run-cache): path -> bytes."""
    root = project / ".dvc/cache/files"
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_sweep_defaults_leave_a_users_own_materialize_alone():
    assert with_sweep_defaults(["select.min_clip_similarity=0.1"]) == [
        "select.min_clip_similarity=0.1", "++assemble.materialize=false"]
    for given in ("assemble.materialize=true", "++assemble.materialize=true", "+assemble.materialize=false"):
        assert with_sweep_defaults(["subset.parts=[0]", given]) == ["subset.parts=[0]", given]


def test_materialized_params_flips_the_one_line():
    text = "recipe:\n  name: demo\nassemble:\n  samples_per_shard: 10\n  materialize: false\nexport:\n  h5: false\n"
    assert materialized_params(text) == text.replace("materialize: false", "materialize: true")
    with pytest.raises(RecipeError, match="does not say assemble.materialize: false"):
        materialized_params(text.replace("materialize: false", "materialize: true"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project, _ = shared_demo(tmp_path_factory)
    return project


@pytest.fixture(scope="module")
def plain(built, tmp_path_factory):
    """Today's plain build of the recipe (with both export formats on), in a project of its own."""
    project = copy_of(built, tmp_path_factory.mktemp("plain") / "project")
    project.laionbuild("build", *OVERRIDES, *EXPORTS, f"select.min_clip_similarity={DEFAULT_THRESHOLD}")
    assert json.loads((project / "data/export/export.json").read_text())["emb.h5"]["rows"] > 0
    return project


def test_a_sweep_point_is_a_selection_and_materialising_it_is_todays_build(built, plain, tmp_path):
    swept = copy_of(built, tmp_path / "swept")
    shutil.rmtree(swept / ".dvc/cache/runs")  # materialising must run assemble, not restore the shared demo's run
    sims = sorted(json.loads(s["json"])["tags"]["clip_similarity"] for s in _dataset_members(built))
    median = sims[len(sims) // 2]
    before = cache_objects(swept)
    result = swept.laionbuild("build", "-m", *OVERRIDES, *EXPORTS,
                              f"select.min_clip_similarity={DEFAULT_THRESHOLD},{median!r}")
    # the first point's selection is the shared demo's (not rerun); both write the marker, so
    # the index (its deps: the marker) is built at most once for the two
    assert result.ran.count("select") == 1 and result.ran.count("assemble") == 2, " ".join(result.ran)
    assert result.ran.count("index") <= 1, " ".join(result.ran)
    assert not any(s.startswith(("download", "embed")) for s in result.ran)  # the points share them
    names = [f"min_clip_similarity={DEFAULT_THRESHOLD}", f"min_clip_similarity={median!r}"]

    # dvc exp show compares the points by their funnel metrics and params
    exps = experiments(swept)
    assert set(names) <= set(exps), sorted(exps)
    selected = [exps[n]["metrics"]["selected"] for n in names]
    assert selected[0] == len(sims) and 0 < selected[1] < selected[0]
    assert [exps[n]["params"]["assemble"]["materialize"] for n in names] == [False, False]
    assert [exps[n]["params"]["select"]["min_clip_similarity"] for n in names] == [DEFAULT_THRESHOLD, median]

    # no image bytes or vectors cached per point: no tar, no .npy, no HDF5; what a point adds is
    # its selection, its report (a fixed number of thumbnails: ~330 KB here) and small files
    added = {p: n for p, n in cache_objects(swept).items() if p not in before}
    for path in added:
        head = (swept / ".dvc/cache/files" / path).read_bytes()[:8]
        assert not tarfile.is_tarfile(swept / ".dvc/cache/files" / path), path
        assert not head.startswith((b"\x93NUMPY", b"\x89HDF")), path
    assert sum(added.values()) <= 2 * (1_000_000 + 16 * selected[0]), added

    # the point in the workspace, unmaterialised: readable, the same samples in the same order
    swept.dvc("exp", "apply", names[0])
    for rel in ("data/dataset", "data/embeddings", "data/export"):
        assert sorted(p.name for p in (swept / rel).iterdir()) == ["UNMATERIALIZED.json"], rel
    import laionbuild

    point = list(laionbuild.read(swept.path))
    assert "materialised" in (swept / "data/card.md").read_text().lower()

    materialised = swept.laionbuild("materialize")
    for stage in ("assemble", "export", "index"):
        assert stage in materialised.ran, materialised.ran  # built here, not restored
    assert not any(s.startswith(("download", "embed", "tag")) or s == "select" for s in materialised.ran)
    assert _dataset_members(swept) == point  # what read gave, byte for byte, in its order
    for rel in MATERIALISED:
        ours, theirs = digests(swept / f"data/{rel}"), digests(plain / f"data/{rel}")
        if rel == "index":  # autofaiss's own infos hold its timed search speed and its scratch path
            infos = [json.loads((root / "data/index/image_infos.json").read_text()) for root in (swept.path, plain.path)]
            assert {k: v for k, v in infos[0].items() if k not in AUTOFAISS_VOLATILE} == \
                {k: v for k, v in infos[1].items() if k not in AUTOFAISS_VOLATILE}
            ours.pop("image_infos.json"), theirs.pop("image_infos.json")
            assert "image.index" in ours
        assert ours == theirs, rel
    assert yaml.safe_load((swept / "params.yaml").read_text()) == yaml.safe_load((plain / "params.yaml").read_text())
    assert json.loads(swept.dvc("status", "--json").output) == {"inputs": ["always changed"]}  # all up to date

    again = swept.laionbuild("materialize", check=False)
    assert again.returncode == 2 and "nothing to materialise" in again.output


def test_materialize_refuses_a_workspace_without_a_point(tmp_path):
    from .conftest import new_project

    project = new_project(tmp_path / "empty")
    result = project.laionbuild("materialize", check=False)
    assert result.returncode == 2 and "params.yaml not found" in result.output
    project.laionbuild("compose", "assemble.materialize=false")
    result = project.laionbuild("materialize", check=False)
    assert result.returncode == 2 and "nothing selected to materialise" in result.output
    result = project.laionbuild("materialize", "no-such-point", check=False)  # dvc exp apply's own error
    assert result.returncode != 0 and "no-such-point" in result.output
    assert "materialize: false" in (project / "params.yaml").read_text()  # nothing written


def test_materialising_reads_each_download_shard_forward(built, monkeypatch):
    """part_samples reads the selected images of a part in file order (shard, then offset: never
    a seek back), however img2dataset ordered them, and gives them out in key order: the same
    samples with any read-ahead size, the same as data/dataset holds."""
    import pyarrow.parquet as pq

    from laionbuild.project.outputs import selected_keys
    from laionbuild.shards.samples import IMAGE_EXTENSIONS, part_rows, part_samples

    reads: list[tuple[str, int]] = []
    original = tarfile.TarFile.extractfile

    def recording(self, member):
        if str(getattr(member, "name", member)).rpartition(".")[2] in IMAGE_EXTENSIONS:
            reads.append((self.name, member.offset_data))
        return original(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", recording)
    selected = pq.ParquetFile(built / "data/selected/selected.parquet")
    samples = []
    for part in (0, 1):
        keys = selected_keys(selected, part)
        frame = part_rows(part, keys, built.path)
        reads.clear()
        whole = list(part_samples(part, frame, built.path))
        assert [s["__key__"] for s in whole] == keys
        assert reads == sorted(reads) and len(reads) == len(keys)  # one forward pass over the sorted shards
        one_at_a_time = list(part_samples(part, frame, built.path, read_ahead=1))
        assert one_at_a_time == whole
        samples += whole
    assert samples == _dataset_members(built)
