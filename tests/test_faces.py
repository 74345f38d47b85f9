"""laionbuild.models.face_detectors: the Haar detector on skimage samples, input forms, face_tags, and RetinaFace
through retina-face's own loader with a checkpoint of the real architecture written here (random
weights: nothing needs the network, so only well-formedness is asserted, not what it finds)."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from skimage import data

from laionbuild.models import face_detectors as faces
from laionbuild.models.face_detectors import Face, face_tags, make_detector

ROOT = Path(__file__).resolve().parents[1]


# `make setup` installs retina-face (pyproject cannot: see RETINAFACE_INSTALL), so these run everywhere
# the test command (make test) runs; a missing package fails them.
def needs_retinaface(test):
    return test


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Never the machine's real ~/.deepface: `auto` must see only what a test puts there.
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path / "no-deepface-home"))


def assert_well_formed(found: list[Face], image: np.ndarray, min_score: float) -> None:
    height, width = image.shape[:2]
    assert isinstance(found, list)
    for face in found:
        assert isinstance(face, Face)
        assert all(type(v) is int for v in (face.x, face.y, face.w, face.h))
        assert type(face.score) is float and min_score <= face.score <= 1.0
        assert face.w > 0 and face.h > 0
        assert 0 <= face.x and face.x + face.w <= width and 0 <= face.y and face.y + face.h <= height
    assert found == faces.sort_faces(found)


# ------------------------------------------------------------------------------------------- Haar


@pytest.fixture(scope="module")
def haar():
    detector = make_detector("auto")  # no retinaface weights anywhere: the default is Haar
    assert detector.name == "opencv_haar"
    return detector


def test_default_detector_finds_the_astronaut_and_no_face_in_coffee_or_the_cat(haar):
    astronaut = data.astronaut()
    found = haar.detect(astronaut)
    assert len(found) >= 1
    assert_well_formed(found, astronaut, 0.5)
    best = found[0]
    cx, cy = best.x + best.w / 2, best.y + best.h / 2
    assert 170 < cx < 290 and 60 < cy < 180, best  # her face, not the flag or the suit
    assert haar.detect(data.coffee()) == []
    assert haar.detect(data.chelsea()) == []


def test_haar_score_is_a_monotone_squash_and_min_score_filters():
    scores = [faces.HaarDetector.score(w) for w in (-3.0, 0.0, 2.0, 5.0, 12.0)]
    assert scores == sorted(scores) and all(0.0 < s < 1.0 for s in scores) and scores[2] == 0.5
    astronaut = data.astronaut()
    everything = make_detector("opencv_haar", min_score=0.0).detect(astronaut)
    strict = make_detector("opencv_haar", min_score=0.999).detect(astronaut)
    assert len(strict) <= len(everything) and all(f.score >= 0.999 for f in strict)
    assert_well_formed(everything, astronaut, 0.0)


def test_image_forms_are_converted_and_tiny_images_do_not_crash(haar):
    rgb = data.astronaut()
    expected = haar.detect(rgb)
    gray = (rgb @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
    assert len(haar.detect(gray)) >= 1
    assert len(haar.detect(gray[:, :, None])) >= 1
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    assert haar.detect(rgba) == expected
    assert_well_formed(haar.detect(data.camera()), data.camera(), 0.5)  # a profile: anything goes
    for shape in [(0, 0, 3), (1, 1), (5, 7, 3), (23, 23, 4), (24, 24, 3), (30, 200, 1)]:
        image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        assert_well_formed(haar.detect(image), image, 0.5)
    with pytest.raises(TypeError, match="uint8"):
        haar.detect(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        haar.detect(np.zeros((4, 4, 2), np.uint8))


def test_face_tags_are_sorted_rounded_json():
    assert face_tags([]) == {"face_count": 0, "face_max_score": 0.0, "face_boxes": "[]"}
    found = [Face(5, 5, 10, 10, 0.25), Face(9, 1, 4, 4, 0.912345678), Face(1, 2, 3, 3, 0.912345678)]
    tags = face_tags(found)
    assert tags["face_count"] == 3
    assert tags["face_max_score"] == 0.9123 and isinstance(tags["face_max_score"], float)
    assert json.loads(tags["face_boxes"]) == [[1, 2, 3, 3, 0.9123], [9, 1, 4, 4, 0.9123], [5, 5, 10, 10, 0.25]]
    assert face_tags(list(reversed(found))) == tags


def test_bad_names_and_options_are_clear_errors():
    with pytest.raises(ValueError, match="`mtcnn` is not one of opencv_haar, retinaface, auto"):
        make_detector("mtcnn")
    with pytest.raises(ValueError, match="min_score"):
        make_detector("opencv_haar", min_score=1.5)
    with pytest.raises(TypeError, match="unknown"):
        make_detector("auto", min_neighbours=3)
    with pytest.raises(FileNotFoundError, match="nope.xml"):
        make_detector("opencv_haar", weights="nope.xml")


# ------------------------------------------------------------------------------------- RetinaFace


def test_retinaface_missing_weights_names_the_path_and_never_downloads(tmp_path, monkeypatch):
    missing = tmp_path / "models" / "retinaface.pth"
    with pytest.raises(FileNotFoundError, match=f"weights file {missing} does not exist"):
        make_detector("retinaface", weights=missing)
    home = tmp_path / "home"
    monkeypatch.setenv("DEEPFACE_HOME", str(home))
    with pytest.raises(FileNotFoundError, match=str(home / ".deepface" / "weights" / "retinaface.pth")):
        make_detector("retinaface")
    assert not (home / ".deepface").exists()  # retina-face's loader (which creates it) never ran


def test_retinaface_without_the_package_says_how_to_install(tmp_path, monkeypatch, caplog):
    weights = tmp_path / "retinaface.pth"
    weights.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "retinaface", None)
    monkeypatch.setitem(sys.modules, "retinaface.commons", None)
    with pytest.raises(ImportError, match="pip install --no-deps retina-face==0.0.19"):
        make_detector("retinaface", weights=weights)
    monkeypatch.setattr(faces, "retinaface_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="laionbuild.models.face_detectors"):
        assert make_detector("auto", weights=weights).name == "opencv_haar"
    assert "retina-face package is not installed" in caplog.text


@pytest.fixture(scope="module")
def retinaface_home(tmp_path_factory) -> Path:
    """A DEEPFACE_HOME whose .deepface/weights/retinaface.pth is the package's own RetinaFace
    (ResNet-50) with seeded random init, saved as the state_dict its loader reads."""
    import torch
    from retinaface.model.retinaface_pth_model import RetinaFace

    home = tmp_path_factory.mktemp("deepface-home")
    path = home / ".deepface" / "weights" / "retinaface.pth"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(RetinaFace().state_dict(), path)
    return home


@needs_retinaface
def test_retinaface_checkpoint_round_trip(retinaface_home, tmp_path):
    weights = retinaface_home / ".deepface" / "weights" / "retinaface.pth"
    before = os.environ["DEEPFACE_HOME"]
    # min_score 0: every anchor passes, so there are boxes to check; no upscaling keeps NMS small.
    detector = make_detector("retinaface", weights=weights, min_score=0.0, allow_upscaling=False)
    assert detector.name == "retinaface" and detector.weights == weights
    assert os.environ["DEEPFACE_HOME"] == before  # set only around the load
    assert ("ignore", None, Warning, None, 0) not in warnings.filters  # the package's global ignore undone
    image = np.ascontiguousarray(data.astronaut()[::8, ::8])  # 64x64
    found = detector.detect(image)
    assert len(found) >= 1
    assert_well_formed(found, image, 0.0)
    tags = face_tags(found)
    assert tags["face_count"] == len(found) and len(json.loads(tags["face_boxes"])) == len(found)

    # Any file name/location: loaded through the same package loader (via a temporary symlink).
    elsewhere = tmp_path / "my-retinaface-r50.pth"
    elsewhere.symlink_to(weights)
    again = make_detector("retinaface", weights=elsewhere, min_score=0.0, allow_upscaling=False)
    assert again.detect(image) == found  # same weights, deterministic

    gray = image[:20, :30, 0]
    assert_well_formed(detector.detect(gray), gray, 0.0)
    rgba = np.dstack([image, np.full((64, 64), 255, np.uint8)])
    assert detector.detect(rgba) == found
    # The package's default upscales to a 1024 px shorter side: a ResNet-50 pass of ~5 s on one
    # core, so it is not run here; it is the same call with allow_upscaling=True.
    assert make_detector("retinaface", weights=weights).allow_upscaling is True


@needs_retinaface
def test_auto_picks_retinaface_when_its_weights_exist(retinaface_home, tmp_path, monkeypatch):
    weights = retinaface_home / ".deepface" / "weights" / "retinaface.pth"
    options = {"allow_upscaling": False, "min_neighbors": 5}  # each detector takes its own
    assert make_detector("auto", weights=weights, **options).name == "retinaface"
    assert make_detector("auto", weights=tmp_path / "absent.pth", **options).name == "opencv_haar"
    assert make_detector("auto", **options).name == "opencv_haar"
    monkeypatch.setenv("DEEPFACE_HOME", str(retinaface_home))  # the package's default location
    assert faces.default_retinaface_weights() == weights
    assert make_detector("auto", **options).name == "retinaface"
