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
from PIL import Image

from .conftest import BIN, FAST, build_env
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
