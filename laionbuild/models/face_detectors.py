"""Face detection behind one small interface, for the per-part face tags.

Detectors (`make_detector(name)`):
- `opencv_haar`: OpenCV's frontal-face Haar cascade, shipped inside OpenCV, so it works offline
  with no weights to fetch. Crude: frontal faces only, and its score is a squashed cascade margin,
  not a probability (see `HaarDetector`).
- `retinaface`: RetinaFace (ResNet-50) through the `retina-face` package (serengil/retinaface
  0.0.19, PyTorch backend), as the LAION-Face seed project used. Its score is the model's face
  probability. Weights are never downloaded here: a missing file is an error naming the path.
- `auto`: `retinaface` when its weights file exists (and the package imports), else `opencv_haar`.

The two scores are on different scales; compare `face_max_score` only between rows tagged by the
same detector. Output is deterministic: faces sorted by score (desc), then x, y, w, h.

`retina-face` is not a hard dependency. Install it without its declared deps, which would pull a
second OpenCV distribution (`opencv-contrib-python-headless`, also providing `cv2`) and numpy 2:
    pip install --no-deps retina-face==0.0.19 && pip install gdown
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from laionbuild.environment import patched
from laionbuild.recipe.errors import InputError, MissingInputError
from laionbuild.recipe.values import FACE_DETECTORS

log = logging.getLogger(__name__)

# the detectors that tag faces (`none`, the recipe's off switch, never reaches this module)
DETECTORS = tuple(name for name in FACE_DETECTORS if name != "none")
RETINAFACE_INSTALL = "pip install --no-deps retina-face==0.0.19 && pip install gdown"
# Where retina-face's weight_utils looks for (and, left to itself, downloads) the PyTorch weights.
RETINAFACE_WEIGHTS_REL = Path(".deepface") / "weights" / "retinaface.pth"
RETINAFACE_WEIGHTS_URLS = (
    "https://github.com/serengil/deepface_models/releases/download/v1.0/retinaface.pth",
    "https://huggingface.co/serengil/deepface/resolve/main/retinaface.pth",
)
HAAR_CASCADE = "haarcascade_frontalface_default.xml"
# Haar score = logistic((level_weight - CENTER) / SCALE). The level weight is the cascade's last-stage
# sum for the best window of a group; every reported window passed that stage (sum >= its threshold,
# about -3.0). On skimage samples the astronaut's face scored 2.7..11.4 over sizes 128..1024 px,
# secondary boxes and false positives mostly below 2, so the default min_score=0.5 (weight >= 2)
# drops most of those. A heuristic margin, not a calibrated probability.
HAAR_WEIGHT_CENTER = 2.0
HAAR_WEIGHT_SCALE = 1.0

_ENV_LOCK = threading.Lock()  # os.environ is process-wide: one temporary override at a time


@dataclass(frozen=True)
class Face:
    """A face box in pixels of the image given to `detect`, and a score in [0, 1]."""

    x: int
    y: int
    w: int
    h: int
    score: float


class Detector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an HxWx3 uint8 RGB image (gray, HxWx1 and RGBA are converted), sorted."""
        ...


def as_rgb(image: np.ndarray) -> np.ndarray:
    """HxWx3 contiguous uint8 RGB from gray (HxW, HxWx1), RGB or RGBA (alpha dropped, as PIL does)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"face detection expects a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"face detection expects an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def sort_faces(faces: list[Face]) -> list[Face]:
    return sorted(faces, key=lambda f: (-f.score, f.x, f.y, f.w, f.h))


def face_tags(faces: list[Face]) -> dict:
    """Per-image tags: face_count, face_max_score (0.0 when none) and face_boxes, a JSON list of
    [x, y, w, h, score] sorted like `sort_faces`. Scores are rounded to 4 decimals in both, so the
    max score equals the first box's score and the strings are stable across runs."""
    ordered = sort_faces(faces)
    boxes = [[f.x, f.y, f.w, f.h, round(float(f.score), 4)] for f in ordered]
    return {
        "face_count": len(ordered),
        "face_max_score": boxes[0][4] if boxes else 0.0,
        "face_boxes": json.dumps(boxes, separators=(",", ":")),
    }


def _clipped_face(x1: float, y1: float, x2: float, y2: float, score: float, width: int, height: int) -> Face | None:
    x1, x2 = (int(min(max(v, 0), width)) for v in (x1, x2))
    y1, y2 = (int(min(max(v, 0), height)) for v in (y1, y2))
    if x2 <= x1 or y2 <= y1:
        return None
    return Face(x1, y1, x2 - x1, y2 - y1, float(min(max(score, 0.0), 1.0)))


# ---------------------------------------------------------------------------------------------- Haar


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (`cv2.data.haarcascades`), offline and fast.

    The cascade gives no probability. `detectMultiScale3(outputRejectLevels=True)` returns each
    group's level weight (last-stage sum); the score is logistic((weight - 2.0) / 1.0), monotone in
    the weight, so thresholds order the same way. It is NOT comparable to RetinaFace's probability.

    Defaults (scaleFactor 1.1, minNeighbors 5, minimum face side max(24 px, 5% of the shorter image
    side), no histogram equalisation) find the face in skimage's `astronaut` from 128 to 1024 px and
    nothing in `coffee` or `chelsea` (a cat); equalisation and minNeighbors 3 both added false
    positives on textures (`moon`, `gravel`, blurred noise) without finding more faces.
    """

    name = "opencv_haar"

    def __init__(self, min_score: float = 0.5, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_size_frac: float = 0.05, cascade: str | os.PathLike | None = None):
        import cv2

        path = Path(cascade) if cascade else Path(cv2.data.haarcascades) / HAAR_CASCADE
        if not path.is_file():
            raise MissingInputError(f"opencv_haar: cascade file {path} does not exist")
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise InputError(f"opencv_haar: OpenCV could not load a cascade from {path}")
        self._window = max(self._cascade.getOriginalWindowSize())
        self.min_score = min_score
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size_frac = min_size_frac

    @staticmethod
    def score(level_weight: float) -> float:
        z = (level_weight - HAAR_WEIGHT_CENTER) / HAAR_WEIGHT_SCALE
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))  # no overflow

    def detect(self, image: np.ndarray) -> list[Face]:
        import cv2

        rgb = as_rgb(image)
        height, width = rgb.shape[:2]
        side = max(self._window, round(self.min_size_frac * min(height, width)))
        if min(height, width) < side:
            return []
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        boxes, _levels, weights = self._cascade.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(side, side),
            outputRejectLevels=True)
        faces = []
        for (x, y, w, h), weight in zip(np.reshape(boxes, (-1, 4)), np.ravel(weights)):
            face = _clipped_face(x, y, x + w, y + h, self.score(float(weight)), width, height)
            if face is not None and face.score >= self.min_score:
                faces.append(face)
        return sort_faces(faces)


def haar_cascade_path() -> Path:
    """The frontal-face cascade shipped inside OpenCV (cv2.data.haarcascades), found without
    importing cv2: the build's input check runs on every build and stays light."""
    import importlib.util

    spec = importlib.util.find_spec("cv2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0] if locations else ".") / "data" / HAAR_CASCADE


# ---------------------------------------------------------------------------------------- RetinaFace


def default_retinaface_weights() -> Path:
    """Where retina-face reads its weights: $DEEPFACE_HOME/.deepface/weights/retinaface.pth, with
    DEEPFACE_HOME defaulting to the home directory (the rule of retinaface/commons/weight_utils.py)."""
    return Path(os.getenv("DEEPFACE_HOME", default=str(Path.home()))) / RETINAFACE_WEIGHTS_REL


def retinaface_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("retinaface") is not None
    except (ImportError, ValueError):
        return False


@contextmanager
def _env(**values: str) -> Iterator[None]:
    with _ENV_LOCK, patched(values):
        yield


def _import_retinaface():
    """Import retina-face on its PyTorch backend.

    The package picks its backend once, at import (tensorflow first if installed, else torch, else
    onnx, unless DEEPFACE_BACKEND_ENGINE says), and its RetinaFace module calls
    `warnings.filterwarnings("ignore")` for the whole process: force torch, keep our warning filters."""
    try:
        from retinaface.commons import backend_utils
    except ImportError as err:
        raise ImportError(f"face detector `retinaface` needs the retina-face package: {RETINAFACE_INSTALL}") from err
    with _env(DEEPFACE_BACKEND_ENGINE="pytorch"), warnings.catch_warnings():
        engine = backend_utils.get_backend_engine()
        if engine != "pytorch":
            raise RuntimeError(f"retina-face already chose its `{engine}` backend in this process; laionbuild "
                               "runs it on pytorch: make the detector before other retina-face use, or set "
                               "DEEPFACE_BACKEND_ENGINE=pytorch")
        from retinaface import RetinaFace
        from retinaface.model import retinaface_pth_model
    return RetinaFace, retinaface_pth_model


def _load_retinaface(pth_model, weights: Path):
    """Build the model through retina-face's own loader (`build_model` -> `load_weights` ->
    `weight_utils.download_weights_if_necessary`), which only reads $DEEPFACE_HOME: point it at the
    file's home for the call, via a temporary symlink when the file is not at
    HOME/.deepface/weights/retinaface.pth. The file is known to exist, so the loader never downloads."""
    weights = Path(os.path.abspath(weights))  # not resolve(): a symlink at the expected place is fine
    if weights.parts[-3:] == RETINAFACE_WEIGHTS_REL.parts:
        with _env(DEEPFACE_HOME=str(weights.parents[2])):
            return pth_model.build_model()
    with tempfile.TemporaryDirectory(prefix="laionbuild-retinaface-") as home:
        link = Path(home) / RETINAFACE_WEIGHTS_REL
        link.parent.mkdir(parents=True)
        link.symlink_to(weights)
        with _env(DEEPFACE_HOME=home):
            return pth_model.build_model()


class RetinaFaceDetector:
    """RetinaFace (ResNet-50) from retina-face 0.0.19 on PyTorch, CPU. Score = the model's face
    probability; `min_score` is passed to the package as its detection threshold (its own default
    is 0.9).

    `allow_upscaling` is the package's option and default: the image is resized so its shorter side
    is 1024 px (longer side at most 1980), which finds small faces in 256 px thumbnails but costs a
    full ResNet-50 at 1024x1024 per image. False keeps the image size (faster, misses small faces).
    """

    name = "retinaface"

    def __init__(self, weights: str | os.PathLike | None = None, min_score: float = 0.5,
                 allow_upscaling: bool = True):
        path = Path(weights).expanduser() if weights else default_retinaface_weights()
        if not path.is_file():
            raise MissingInputError(
                f"retinaface: weights file {path} does not exist (laionbuild never downloads it). Put "
                f"retinaface.pth from {RETINAFACE_WEIGHTS_URLS[0]} there, or pass weights=PATH")
        retinaface, pth_model = _import_retinaface()
        self._detect_faces = retinaface.detect_faces
        self._model = _load_retinaface(pth_model, path)
        self.weights = path
        self.min_score = min_score
        self.allow_upscaling = allow_upscaling

    def detect(self, image: np.ndarray) -> list[Face]:
        rgb = as_rgb(image)
        height, width = rgb.shape[:2]
        if height == 0 or width == 0:
            return []
        # The package takes OpenCV's BGR order and flips it back to RGB itself.
        found = self._detect_faces(np.ascontiguousarray(rgb[:, :, ::-1]), threshold=self.min_score,
                                   model=self._model, allow_upscaling=self.allow_upscaling)
        faces = []
        for item in found.values() if isinstance(found, dict) else ():
            x1, y1, x2, y2 = item["facial_area"]
            face = _clipped_face(x1, y1, x2, y2, float(item["score"]), width, height)
            if face is not None:
                faces.append(face)
        return sort_faces(faces)


# ------------------------------------------------------------------------------------------- factory

_HAAR_OPTIONS = {"scale_factor", "min_neighbors", "min_size_frac"}
_RETINAFACE_OPTIONS = {"allow_upscaling"}


def make_detector(name: str, weights: str | os.PathLike | None = None, min_score: float = 0.5,
                  **kw) -> Detector:
    """`opencv_haar` (weights: an optional cascade XML), `retinaface` (weights: retinaface.pth,
    default `default_retinaface_weights()`), or `auto`: retinaface when that weights file exists,
    else opencv_haar. For `auto`, options go to whichever detector is picked and the other's are
    ignored, so one config serves both."""
    if not 0.0 <= min_score <= 1.0:
        raise ValueError(f"face detector min_score must be in [0, 1], got {min_score}")
    if name == "opencv_haar":
        return HaarDetector(min_score=min_score, cascade=weights, **kw)
    if name == "retinaface":
        return RetinaFaceDetector(weights, min_score=min_score, **kw)
    if name != "auto":
        raise ValueError(f"face detector `{name}` is not one of {', '.join(DETECTORS)}")
    unknown = set(kw) - _HAAR_OPTIONS - _RETINAFACE_OPTIONS
    if unknown:
        raise TypeError(f"face detector options {sorted(unknown)} are unknown "
                        f"(opencv_haar: {sorted(_HAAR_OPTIONS)}, retinaface: {sorted(_RETINAFACE_OPTIONS)})")
    path = Path(weights).expanduser() if weights else default_retinaface_weights()
    if path.is_file():
        if retinaface_available():
            return RetinaFaceDetector(path, min_score=min_score,
                                      **{k: v for k, v in kw.items() if k in _RETINAFACE_OPTIONS})
        log.warning("face detector auto: %s exists but the retina-face package is not installed (%s); "
                    "using opencv_haar", path, RETINAFACE_INSTALL)
    elif weights:
        log.warning("face detector auto: retinaface weights %s do not exist; using opencv_haar", path)
    return HaarDetector(min_score=min_score, **{k: v for k, v in kw.items() if k in _HAAR_OPTIONS})
