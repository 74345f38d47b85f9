"""faces: face tags of one part (`data/faces/part_N/faces.parquet`: key, face_count,
face_max_score, face_boxes as JSON [[x, y, w, h, score], ...] in the stored image's pixels),
detected on the downloaded shards (`tag.faces.detector`, see laionbuild/models/face_detectors.py).

Shards are tagged in parallel, one process per shard (`tag.faces.processes`; with one process or
one shard to do, in the stage's own process: a spawned worker costs ≈2 s). Each finished
shard's tags are written atomically to `data/.work/faces/part_N-<fingerprint>/`, so a killed run
resumes with the shards it has not finished; the part is assembled in key order and moved into
place only when every shard is done. With `detector: none` the table has the keys and no face
columns, and nothing is decoded."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild.project.atomic import atomic_dir, atomic_file
from laionbuild.project.funnel import Counts
from laionbuild.project.inputs import recorded
from laionbuild.project.layout import KEY_COLUMN, WORK, part_dir
from laionbuild.shards.storage import Shard, is_url, open_binary, part_shards

log = logging.getLogger(__name__)
SCHEMA = pa.schema([("key", pa.string()), ("face_count", pa.int32()), ("face_max_score", pa.float32()),
                    ("face_boxes", pa.string())])
_detector = None  # one per worker process


def _detector_for(settings: dict):
    from laionbuild.models.face_detectors import make_detector

    options = {} if settings["detector"] == "opencv_haar" else {"allow_upscaling": settings["upscale"]}
    return make_detector(settings["detector"], weights=settings["weights"], min_score=settings["min_score"],
                         **options)


def _init_worker(settings: dict) -> None:
    """Make this process's detector, on one thread: one process per shard, each on one core, or
    the processes fight over them (and the same threads whatever tag.faces.processes is, so the
    same scores). torch is imported (≈1.5 s per process) only for the detectors that run on it,
    not for OpenCV's Haar cascade."""
    global _detector
    import cv2

    cv2.setNumThreads(1)
    if settings["detector"] != "opencv_haar":
        import torch

        torch.set_num_threads(1)
    _detector = _detector_for(settings)


def _tag_shard(location: str, target: str) -> int:
    """Tags of one shard -> `target` (written atomically). Returns the row count."""
    from PIL import Image

    from laionbuild.models.face_detectors import face_tags

    samples: dict[str, dict] = {}
    with open_binary(location) as f, tarfile.open(fileobj=f) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            stem, _, ext = member.name.partition(".")
            samples.setdefault(stem, {})[ext] = tar.extractfile(member).read()
    rows = []
    for stem in sorted(samples):
        sample = samples[stem]
        image_bytes = next((sample[e] for e in ("jpg", "png", "webp") if e in sample), None)
        if image_bytes is None or "json" not in sample:
            continue
        key = json.loads(sample["json"])[KEY_COLUMN]
        image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
        rows.append({"key": str(key), **face_tags(_detector.detect(image))})
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    with atomic_file(target) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows


def _fingerprint(cfg, shards: list[Shard]) -> str:
    f = cfg.tag.faces
    # with what the detector resolved to and its weights' digest (the inputs stage's record)
    digest = hashlib.sha256(json.dumps([f.detector, f.weights, f.min_score, f.upscale, recorded("faces.json")],
                                       sort_keys=True).encode())
    for shard in shards:  # a URL's prefix is named by its content; a local file also by its mtime
        mtime = 0 if is_url(shard.location) else Path(shard.location).stat().st_mtime_ns
        digest.update(f"{shard.location}:{shard.size}:{mtime}".encode())
    return digest.hexdigest()[:16]


def run(cfg, part: int) -> None:
    f = cfg.tag.faces
    counts = Counts()
    if f.detector == "none":  # (img2dataset's parquet files only, always in the part's directory)
        keys = []
        for path in sorted(part_dir("download", part).glob("*.parquet")):
            t = pq.read_table(path, columns=["status", KEY_COLUMN]).to_pydict()
            keys += [k for k, s in zip(t[KEY_COLUMN], t["status"]) if s == "success"]
        table = pa.table({"key": pa.array(sorted(keys), pa.string())})
    else:
        settings = {"detector": f.detector, "weights": f.weights, "min_score": f.min_score, "upscale": f.upscale}
        name = _detector_for(settings).name  # a bad setting fails here, in the stage's own process
        shards = part_shards(part_dir("download", part))
        work = WORK / "faces" / f"part_{part}-{_fingerprint(cfg, shards)}"
        work.mkdir(parents=True, exist_ok=True)
        targets = [work / f"{shard.name}.parquet" for shard in shards]
        todo = [(s.location, str(t)) for s, t in zip(shards, targets) if not t.exists()]
        workers = min(f.processes, len(todo))
        if workers == 1:  # one shard to do, or tag.faces.processes=1: no pool to spawn (≈2 s per process)
            _init_worker(settings)
            for location, target in todo:
                log.debug("tagged a shard of %d images", _tag_shard(location, target))
        elif todo:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                     initializer=_init_worker, initargs=(settings,)) as pool:
                for n in pool.map(_tag_shard, *zip(*todo)):
                    log.debug("tagged a shard of %d images", n)
        table = pa.concat_tables([pq.read_table(t) for t in targets]) if targets else SCHEMA.empty_table()
        table = table.sort_by("key")
        counts.set("with_faces", sum(1 for c in table.column("face_count").to_pylist() if c))
        log.info("faces of part %d (%s): %d images, %d with faces", part, name, table.num_rows,
                 counts.values["with_faces"])
    counts.set("face_tagged", table.num_rows)
    with atomic_dir(part_dir("faces", part)) as out:
        pq.write_table(table, out / "faces.parquet")
        counts.save(out, detector=f.detector)
    if f.detector != "none":
        shutil.rmtree(work, ignore_errors=True)
