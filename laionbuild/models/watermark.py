"""LAION-5B's pixel watermark classifier (LAION-AI/LAION-5B-WatermarkDetection), loaded from its
published checkpoint layout and run batched on the decoded images.

The model, as LAION's `inference.py` / `example_use.py` build it:

    model = timm.create_model("efficientnet_b3a", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(
        nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(p=0.3),
        nn.Linear(625, 256), nn.ReLU(),
        nn.Linear(256, 2))
    model.load_state_dict(torch.load("watermark_model_v1.pt"))

Input: the image resized to 256x256 (torchvision `T.Resize((256, 256))` on the PIL image:
bilinear, no crop, aspect ratio not kept), `T.ToTensor()`, `T.Normalize` with ImageNet's
mean/std. Output: `softmax(logits)[:, 0]` is p(watermark) (LAION's `P Watermark` column, the
`pwatermark` of LAION-5B's metadata; index 1 is `P Clean`).

Checkpoint layout (`torch.save(model.state_dict())`, read with `weights_only=True`, so a pickled
model object is refused): the timm backbone's own keys (`conv_stem.weight`, `bn1.*`,
`blocks.S.B.*`, `conv_head.weight`, `bn2.*`: 572 entries for efficientnet_b3 in timm 1.0, 78 of
them BatchNorm `num_batches_tracked` counters) plus
the head's, at the Sequential indices of its Linear layers:

    classifier.0.weight (625, 1536)   classifier.0.bias (625,)
    classifier.3.weight (256, 625)    classifier.3.bias (256,)
    classifier.5.weight (2, 256)      classifier.5.bias (2,)

`head` (the hidden sizes, LAION's `[625, 256]`) generalises it: Linear-ReLU-Dropout for the first
hidden layer, Linear-ReLU for each further one, then Linear(…, 2). timm 1.0 maps the name
`efficientnet_b3a` (deprecated) to `efficientnet_b3`, the same modules and keys. A top-level
{"state_dict": ...} wrapper is unwrapped and a `module.` prefix (DistributedDataParallel) is
dropped; any other mismatch (missing or unexpected keys, a shape) is an error naming the file and
the keys, never a partial load.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from laionbuild.recipe.errors import InputError, MissingInputError

log = logging.getLogger(__name__)

LAION_ARCHITECTURE = "efficientnet_b3a"
LAION_HEAD = (625, 256)
LAION_IMAGE_SIZE = 256
LAION_WEIGHTS_URL = "https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WATERMARK_CLASS = 0  # softmax column of p(watermark); 1 is p(clean)
HEAD_DROPOUT = 0.3  # after the first hidden layer (inactive in eval: no effect on scores or keys)


def head_layers(in_features: int, hidden: Sequence[int]):
    """The classifier head: LAION's layout for hidden=(625, 256)."""
    from torch import nn

    layers: list = []
    width = in_features
    for i, size in enumerate(hidden):
        layers += [nn.Linear(width, int(size)), nn.ReLU()] + ([nn.Dropout(p=HEAD_DROPOUT)] if i == 0 else [])
        width = int(size)
    return nn.Sequential(*layers, nn.Linear(width, 2))


def _classifier_name(model) -> str:
    """Where the timm model keeps its classifier (`classifier` for EfficientNets, `fc`, `head.fc`...)."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "classifier"
    return name[0] if isinstance(name, (list, tuple)) else name


def build_model(architecture: str = LAION_ARCHITECTURE, head: Sequence[int] = LAION_HEAD):
    """The untrained timm backbone with the head in place of its classifier (eval mode, CPU)."""
    import timm

    with warnings.catch_warnings():  # timm: "Mapping deprecated model name efficientnet_b3a to ..."
        warnings.filterwarnings("ignore", message="Mapping deprecated model name")
        try:
            model = timm.create_model(architecture, pretrained=False, num_classes=2)
        except RuntimeError as err:  # timm's "Unknown model (...)"
            raise InputError(f"tag.watermark.architecture: `{architecture}` is not a timm model ({err})") from None
    name = _classifier_name(model)
    parent = model
    *path, last = name.split(".")
    for attr in path:
        parent = getattr(parent, attr)
    in_features = getattr(getattr(parent, last), "in_features", None)
    if in_features is None:
        raise InputError(f"tag.watermark.architecture: `{architecture}`'s classifier `{name}` is not a Linear layer; "
                         "use a timm model with a linear classifier (LAION used efficientnet_b3a)")
    setattr(parent, last, head_layers(int(in_features), head))
    return model.eval()


def read_state_dict(path: str | os.PathLike) -> dict:
    """The checkpoint's tensors by key (unwrapped; see the module docstring)."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInputError(f"tag.watermark.weights: {path} does not exist (laionbuild never downloads it; "
                                f"LAION's file is {LAION_WEIGHTS_URL})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a pickled model, a zip of something else, a truncated file
        raise InputError(f"{path}: not a torch state dict torch.load(weights_only=True) can read "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); save it with "
                         "torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and set(state) == {"state_dict"}:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: expected a state dict (key -> tensor), got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _listed(keys: Sequence[str], limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def fit_problems(model, state: dict) -> list[str]:
    """What keeps `state` from loading into `model` exactly: missing, unexpected, misshapen keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (the model's {tuple(v.shape)})" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return ([f"missing {len(missing)} keys: {_listed(missing)}"] if missing else []) + \
           ([f"{len(unexpected)} unexpected keys: {_listed(unexpected)}"] if unexpected else []) + \
           ([f"shapes differ: {_listed(shapes, 3)}"] if shapes else [])


def load_model(path: str | os.PathLike, architecture: str = LAION_ARCHITECTURE, head: Sequence[int] = LAION_HEAD):
    """The classifier with the checkpoint's weights, in eval mode on the CPU."""
    model = build_model(architecture, head)
    state = read_state_dict(path)
    problems = fit_problems(model, state)
    if problems:
        raise InputError(f"{path}: does not fit timm `{architecture}` with head {list(head)} "
                         f"(tag.watermark.architecture, tag.watermark.head): {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model


def preprocess(image_size: int = LAION_IMAGE_SIZE):
    """PIL image -> normalised (3, size, size) tensor, LAION's transform (RGB first: a gray or
    RGBA image would not fit the three-channel normalisation)."""
    from torchvision import transforms as T

    transform = T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return lambda image: transform(image.convert("RGB"))


def resolve_device(device: str) -> str:
    """`auto`: the first GPU when torch sees one, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class WatermarkScorer:
    """p(watermark) for batches of images. The same model and images give the same scores for any
    batch size on one device; CPU and GPU may differ in the last bits (float kernels)."""

    def __init__(self, weights: str | os.PathLike, architecture: str = LAION_ARCHITECTURE,
                 head: Sequence[int] = LAION_HEAD, image_size: int = LAION_IMAGE_SIZE, device: str = "cpu"):
        self.device = resolve_device(device)
        self.model = load_model(weights, architecture, head).to(self.device)
        self.transform = preprocess(image_size)

    def score_tensors(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.model(batch.to(self.device))
            return torch.softmax(logits.float(), dim=1)[:, WATERMARK_CLASS].cpu().numpy().astype(np.float32)

    def score(self, images: Sequence) -> np.ndarray:
        """PIL images -> (N,) float32 p(watermark)."""
        import torch

        if not images:
            return np.zeros(0, np.float32)
        return self.score_tensors(torch.stack([self.transform(image) for image in images]))
