"""Face tags in the build: recipe=mscoco_face end to end on real photos (scikit-image's astronaut
has a face; coffee and chelsea the cat do not) with the default detector, and kill-and-resume of
the faces stage."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from .conftest import BIN, build_env
from .imageserver import source_overrides
from .webfaults import FaultyWeb


def photo(name: str, size: int | None = None) -> bytes:
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    if size:
        image = image.resize((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class PhotoWeb(FaultyWeb):
    """/photo/NAME.jpg -> scikit-image's sample photo NAME."""

    def __init__(self):
        super().__init__()
        photos = {name: photo(name) for name in ("astronaut", "coffee", "chelsea")}
        handler = self.servers[0].RequestHandlerClass
        route = handler._route

        def _route(self, first):
            kind, _, name = self.path.strip("/").partition("/")
            if kind == "photo":
                return self._image(photos[name.split("?")[0].removesuffix(".jpg")])
            return route(self, first)

        handler._route = _route


def test_mscoco_face_keeps_the_image_with_a_face(project, tmp_path):
    with PhotoWeb() as web:
        rows = [{"URL": web.url(0, f"/photo/{name}.jpg"), "TEXT": f"{name} caption {c}"}
                for name in ("coffee", "astronaut", "chelsea") for c in range(5)]  # five captions per image
        (tmp_path / "coco").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "coco" / "mscoco.parquet")
        project.build("recipe=mscoco_face", f"source.base_url={tmp_path / 'coco'}", "download.allow_private_urls=true",
                      "download.image_size=256", "select.min_clip_similarity=null", "embed.pretrained=random")
        assert sum(web.requests.values()) == 3  # each image downloaded once
    tags = pq.read_table(project / "data/tags/part_0/tags.parquet").to_pylist()
    deduped = pq.read_table(project / "data/deduped/part_0/metadata.parquet").to_pylist()
    name_of = {row["key"]: row["url"].rsplit("/", 1)[1].removesuffix(".jpg") for row in deduped}
    faces = {name_of[t["key"]]: t["face_count"] for t in tags}
    assert faces["astronaut"] >= 1 and faces["coffee"] == 0 and faces["chelsea"] == 0
    astronaut = next(t for t in tags if name_of[t["key"]] == "astronaut")
    boxes = json.loads(astronaut["face_boxes"])
    assert len(boxes) == astronaut["face_count"] and all(len(b) == 5 for b in boxes)
    assert astronaut["face_max_score"] == pytest.approx(max(b[4] for b in boxes), abs=1e-4)
    selected = pq.read_table(project / "data/selected/selected.parquet").column("key").to_pylist()
    assert [name_of[k] for k in selected] == ["astronaut"]
    assert [len(r["captions"]) for r in deduped] == [5, 5, 5]
    funnel = json.loads((project / "data/metrics/funnel.json").read_text())
    assert funnel["after_min_faces"] == funnel["selected"] == 1 and funnel["with_faces"] == 1


def _run_faces(project, kill_after: float | None) -> int:
    proc = subprocess.Popen([str(BIN / "laionbuild"), "stage", "faces", "--part", "0"], cwd=project.path,
                            env=build_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    if kill_after is None:
        return proc.wait(timeout=600)
    time.sleep(kill_after)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and its worker processes
    return proc.wait()


def test_faces_stage_killed_at_random_points_resumes_to_the_same_tags(project, tmp_path):
    with PhotoWeb() as web:
        names = ["astronaut", "coffee", "chelsea"]
        urls = [web.url(0, f"/photo/{names[i % 3]}.jpg?{i}") for i in range(24)]
        (tmp_path / "source").mkdir()
        pq.write_table(pa.table({"SAMPLE_ID": list(range(24)), "URL": urls, "TEXT": [f"t{i}" for i in range(24)],
                                 "NSFW": ["UNLIKELY"] * 24}), tmp_path / "source" / "part-00000.parquet")
        project.build(*source_overrides(tmp_path / "source"), "download.allow_private_urls=true",
                      "download.number_sample_per_shard=3", "tag.faces.detector=opencv_haar", "--stage", "faces")
    target = project / "data/faces/part_0/faces.parquet"
    reference = pq.read_table(target)
    assert reference.num_rows == 24 and sum(reference.column("face_count").to_pylist()) >= 8
    rng = random.Random(0)
    for _ in range(3):
        target.unlink()
        assert _run_faces(project, kill_after=rng.uniform(1.0, 6.0)) != 0 or target.exists()
        if not target.exists():
            assert not list((project / "data/faces").glob("part_0/*.parquet"))  # nothing half-written in place
            assert _run_faces(project, kill_after=None) == 0
        assert pq.read_table(target).equals(reference)
    # tag.faces.processes=1 tags every shard in the stage's own process (no pool): the same tags
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["tag"]["faces"]["processes"] > 1  # the runs above went through the pool
    params["tag"]["faces"]["processes"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    target.unlink()
    assert _run_faces(project, kill_after=None) == 0
    assert pq.read_table(target).equals(reference)


def test_laion_face_20m_builds_end_to_end(project, tmp_path):
    """recipe=laion_face, subset=laion_face_20m (two of its parts, to stay fast): id join ->
    download with resize border -> embeddings -> index."""
    import faiss
    import torch

    from .imageserver import ImageServer
    from .standins import LAION400M_NAME, LAION400M_SCHEMA

    source = tmp_path / "laion"
    source.mkdir()
    with ImageServer() as server:
        ids = []
        for part in range(3):
            rows = [{"SAMPLE_ID": part * 1000 + i, "URL": f"{server.url}/img/{part * 100 + i}.jpg",
                     "TEXT": f"a face photo {part} {i}", "HEIGHT": 40, "WIDTH": 48, "LICENSE": "?",
                     "NSFW": "UNLIKELY", "similarity": 0.35} for i in range(12)]
            pq.write_table(pa.Table.from_pylist(rows, schema=LAION400M_SCHEMA), source / LAION400M_NAME.format(part=part))
            ids.append(torch.tensor([r["SAMPLE_ID"] for r in rows[::2]]))  # entry i: the ids kept from part i
        torch.save(ids, tmp_path / "laion_face_ids.pth")
        project.build("recipe=laion_face", "subset=laion_face_20m", "subset.parts=[0,2]", f"source.base_url={source}",
                      f"source.ids_url={tmp_path / 'laion_face_ids.pth'}", "download.allow_private_urls=true",
                      "download.image_size=64", "embed.pretrained=random", "select.min_clip_similarity=null")
        assert len(server.requests) == 12  # only the id-listed rows of parts 0 and 2 were fetched
    funnel = json.loads((project / "data/metrics/funnel.json").read_text())
    assert funnel["after_ids"] == 12 and funnel["downloaded_ok"] == funnel["selected"] == funnel["indexed"] == 12
    with tarfile_open(next((project / "data/images/part_0").glob("*.tar"))) as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        assert Image.open(tar.extractfile(jpg)).size == (64, 64)  # border: the 48x40 images padded to a square
    assert faiss.read_index(str(project / "data/index/image.index")).ntotal == 12


def tarfile_open(path):
    import tarfile

    return tarfile.open(path)


def test_faces_stage_runs_retinaface_from_a_configured_weights_file(project, tmp_path):
    """tag.faces.detector=retinaface with tag.faces.weights: the stage (one shard: in its own
    process, no pool) loads the weights through retina-face's own loader (random weights the test writes: the boxes are
    noise, the loading path and the tag table are real)."""
    import torch
    from retinaface.model.retinaface_pth_model import RetinaFace

    weights = tmp_path / "weights" / "my_retinaface.pth"
    weights.parent.mkdir()
    torch.manual_seed(0)
    torch.save(RetinaFace().state_dict(), weights)
    with PhotoWeb() as web:
        urls = [web.url(0, f"/photo/{n}.jpg") for n in ("astronaut", "coffee")]
        (tmp_path / "source").mkdir()
        pq.write_table(pa.table({"SAMPLE_ID": [0, 1], "URL": urls, "TEXT": ["a", "b"], "NSFW": ["UNLIKELY"] * 2}),
                       tmp_path / "source" / "part-00000.parquet")
        project.build(*source_overrides(tmp_path / "source"), "download.allow_private_urls=true",
                      "download.image_size=64", "tag.faces.detector=retinaface", f"tag.faces.weights={weights}",
                      "tag.faces.min_score=0.99", "--stage", "faces")
    table = pq.read_table(project / "data/faces/part_0/faces.parquet")
    assert table.num_rows == 2 and table.schema.names == ["key", "face_count", "face_max_score", "face_boxes"]
    stats = json.loads((project / "data/faces/part_0/stats.json").read_text())
    assert stats["detector"] == "retinaface"
    missing = project.build(*source_overrides(tmp_path / "source"), "download.allow_private_urls=true",
                            "download.image_size=64", "tag.faces.detector=retinaface",
                            f"tag.faces.weights={tmp_path / 'nope.pth'}", "--stage", "faces", check=False)
    assert missing.returncode != 0 and "nope.pth" in missing.output
