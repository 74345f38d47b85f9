"""Score heads: small models that turn CLIP image embeddings into one float score per sample.

LAION-5B tagged its samples with scores computed from CLIP ViT-L/14 image embeddings (an aesthetic
score, an NSFW probability). A head here is such a model, loaded from the published weight files
and evaluated in numpy, so scoring needs no torch (torch is only used to *read* `.pth` files).

Scoring (`head.score(emb)`: (N, D) float -> (N,) float32)
  - rows are cast to float32 (LAION ships float16 embeddings) and **L2-normalised by the head**,
    because every published head was trained and is used on normalised embeddings (LAION's own
    `normalized()` in improved-aesthetic-predictor and clip-retrieval's clip_back); callers may pass
    raw or normalised embeddings alike;
  - a row that is all zeros or has a non-finite value gets NaN: it is not an embedding, and a number
    made up for it would look like a real score;
  - D must equal the head's `input_dim` (ValueError naming the weights file otherwise): a ViT-L/14
    head (768) scored on ViT-B/32 embeddings (512) is meaningless, and a ViT-H/14 head (1024) too;
  - computed in batches of `batch_size` rows (memory stays bounded for the widest published head).

Kinds (`load_head(kind, path)`, or `kind:` in a `load_heads` spec)
  - `linear`: y = x·w + b, exactly one layer in the file.
  - `mlp`: Linear layers, an activation between consecutive layers (`activation`: "relu" (default)
    or "none", or a list with one entry per gap), then an optional sigmoid (`sigmoid`).
  - `improved_aesthetic`: the published improved-aesthetic-predictor MLP. It is an `mlp` with **no**
    activations (the ReLUs are commented out in its train_predictor.py/simple_inference.py), which
    `mlp`'s ReLU default would get silently wrong; this kind fixes that and checks the file has that
    exact architecture (Sequential indices 0, 2, 4, 6, 7).

Weight files read (torch files with `torch.load(path, map_location="cpu", weights_only=True)`, so a
pickled model object is refused; a top-level {"state_dict": ...} wrapper, as Lightning saves, is
unwrapped):
  1. a single `nn.Linear` state dict: `weight` (1, D), `bias` (1,) -- LAION-AI/aesthetic-predictor
     `sa_0_4_vit_l_14_linear.pth` (D=768; `sa_0_4_vit_b_32_linear.pth` D=512), the LAION-5B
     aesthetic score. Spec: `{kind: linear}`.
  2. an `nn.Sequential` state dict: `<prefix>.<i>.weight` (out, in) / `.bias` (out,), layers in
     index order. Index gaps are the parameter-free modules (ReLU, Dropout) between Linears; as a
     state dict cannot say which, the activation is configured -- except that two Linears with
     consecutive indices have nothing between them, so that gap is always "none" (and an explicit
     "relu" there is an error). Published files in this layout:
       - christophschuhmann/improved-aesthetic-predictor `sac+logos+ava1-l14-linearMSE.pth`:
         `layers.{0,2,4,6,7}`, 768→1024→128→64→16→1, Dropout between, no activations.
         Spec: `{kind: improved_aesthetic}` (= `{kind: mlp, activation: none}` plus the check).
       - LAION-AI/CLIP-based-NSFW-Detector `h14_nsfw.pth` (ViT-H/14, used by clip-retrieval):
         `layers.{0,3,6,9,12,15,16}`, 1024→1024→2048→1024→256→128→16→1, ReLU+Dropout between all
         but the last two Linears, no sigmoid (trained with MSE on 0/1; clip-retrieval thresholds the
         raw output at 0.5). Spec: `{kind: mlp}` (the defaults are exactly this).
  3. numbered named layers `<name><i>.weight/.bias` (e.g. `fc1`, `linear_1`), in number order, with
     optional `norm.mean` / `norm.variance` (D,) input standardisation x <- (x-mean)/(sqrt(var)+1e-10)
     applied after the L2 normalisation. The CLIP-based-NSFW-Detector torch ports of its autokeras
     models are this layout: `models/clip_ViT-L-14_openai_binary_nsfw_head.pth` (norm + `linear_1..4`,
     768→64→512→256→1) and `models/clip_ViT-B-32_openai_binary_nsfw_head.pth` (norm + `linear_1..3`,
     512→32→32→1), ReLU between, sigmoid output. With `norm.*` + `linear_N` keys the sigmoid is on by
     default, as in those models' forward(). Spec: `{kind: mlp}` (or `sigmoid: true`, same thing).
  4. the neutral `.npz` format (`np.load(allow_pickle=False)`), for anything else:
       `W0, b0, W1, b1, ...`   W_i (in, out) -- note: the transpose of a torch weight -- and b_i (out,);
                               y_{i+1} = act(y_i @ W_i + b_i); the last layer has 1 output
       `sigmoid`   optional scalar (0/1): sigmoid on the output
       `activation` optional string, or 1-D string array with one entry per gap ("relu"/"none")
       `mean`, `std` optional (D,): x <- (x - mean) / std after the L2 normalisation
     No other keys are accepted (a typo would otherwise be silently ignored). `save_npz(head, path)`
     writes any loaded head in this format.
  Options in a spec (`sigmoid`, `activation`) override what the file or layout implies.

The NSFW detector as LAION-5B ran it is an autokeras (TensorFlow) model, `clip_autokeras_binary_nsfw`
(ViT-L/14) / `clip_autokeras_nsfw_b32`. This project does not depend on TensorFlow: use the torch
ports above (the repository's convert_heads_to_pytorch.py made them from those Keras models and
checked the outputs match), or convert a Keras model yourself, in an environment that has tensorflow
and autokeras, to the `.npz` format (Keras Dense kernels are already (in, out)):

    import autokeras as ak, numpy as np
    from tensorflow.keras.models import load_model
    m = load_model("clip_autokeras_binary_nsfw", custom_objects=ak.CUSTOM_OBJECTS)
    norm = next(l for l in m.layers if l.__class__.__name__ == "Normalization")
    dense = [l for l in m.layers if l.__class__.__name__ == "Dense"]
    mean, var = (w.numpy().reshape(-1) for w in norm.weights[:2])
    arrays = {"mean": mean, "std": np.sqrt(var) + 1e-10, "sigmoid": np.array(1), "activation": np.array("relu")}
    for i, d in enumerate(dense):
        arrays[f"W{i}"], arrays[f"b{i}"] = d.kernel.numpy(), d.bias.numpy()
    np.savez("clip_l14_nsfw.npz", **arrays)

then compare a few `m.predict(x)` against `load_head("mlp", "clip_l14_nsfw.npz").score(x)` on
normalised x.

Not a CLIP head: LAION-5B's watermark probability (`pwatermark`) came from
LAION-AI/LAION-5B-WatermarkDetection, an EfficientNet-B3 image classifier run on the pixels (256x256,
2-way softmax), so it cannot be computed from embeddings; any "watermark" head loaded here is a
different, embedding-based model and should be documented as such.

`load_heads(specs)` loads a {tag column: spec} mapping. A missing weights file skips that head and
returns a warning naming the tag and the path -- the column is absent, never filled with a made-up
score. A file that exists but does not fit (unknown keys, bad shapes, wrong kind) raises ValueError
naming the file and the key or shape.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from laionbuild.project.files import digest
from laionbuild.recipe.errors import InputError, MissingInputError
from laionbuild.recipe.values import ACTIVATIONS, HEAD_KINDS

KINDS = HEAD_KINDS
SPEC_KEYS = {"kind", "path", "sigmoid", "activation"}
TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}
# improved-aesthetic-predictor's nn.Sequential: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear
IMPROVED_AESTHETIC_INDICES = (0, 2, 4, 6, 7)
NSFW_VARIANCE_EPS = 1e-10  # CLIP-based-NSFW-Detector src/models.py Normalization: (x - mean) / (sqrt(var) + 1e-10)
_NUMBERED = re.compile(r"^(.*?)(\d+)\.(weight|bias)$")
_NPZ_LAYER = re.compile(r"^([Wb])(\d+)$")


@runtime_checkable
class ScoreHead(Protocol):
    """What the tag stage needs: a column name, the embedding width, and a batched scorer."""

    name: str  # tag column name, e.g. "aesthetic_score"
    input_dim: int

    def score(self, image_emb: np.ndarray) -> np.ndarray:
        """(N, input_dim) embeddings, raw or normalised (L2-normalised here) -> (N,) float32."""
        ...


@dataclass(frozen=True)
class Layer:
    weight: np.ndarray  # (in, out) float32, so y = x @ weight + bias
    bias: np.ndarray  # (out,) float32
    label: str  # where it came from in the file ("layers.4", "W2"), for error messages


@dataclass
class MLPHead:
    """A stack of Linear layers evaluated in numpy; `linear` is the one-layer case."""

    name: str
    kind: str
    path: str
    sha256: str  # of the weights file: which weights made a score column
    layers: tuple[Layer, ...]
    activations: tuple[str, ...]  # one per gap between layers
    sigmoid: bool
    input_mean: np.ndarray | None = None
    input_std: np.ndarray | None = None
    batch_size: int = 8192  # rows per matmul batch: 8192 x 2048 float32 = 64 MiB for the widest LAION head

    @property
    def input_dim(self) -> int:
        return int(self.layers[0].weight.shape[0])

    def score(self, image_emb: np.ndarray) -> np.ndarray:
        x = np.asarray(image_emb)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"score head `{self.name}` ({self.path}) takes (N, {self.input_dim}) embeddings, "
                             f"got shape {x.shape}: embeddings from another CLIP model?")
        out = np.empty(len(x), np.float32)
        for start in range(0, len(x), self.batch_size):
            out[start:start + self.batch_size] = self._forward(x[start:start + self.batch_size])
        return out

    def _forward(self, x: np.ndarray) -> np.ndarray:
        h = x.astype(np.float32)  # a copy: the caller's array is never modified
        norms = np.linalg.norm(h, axis=1)
        invalid = ~np.isfinite(norms) | (norms == 0)
        h[invalid] = 0.0  # scored as zeros (no overflow warnings), reported as NaN below
        h /= np.where(invalid, 1.0, norms)[:, None]
        if self.input_mean is not None and self.input_std is not None:
            h = (h - self.input_mean) / self.input_std
        for i, layer in enumerate(self.layers):
            h = h @ layer.weight + layer.bias
            if i < len(self.activations) and self.activations[i] == "relu":
                np.maximum(h, 0, out=h)
        z = h[:, 0]
        if self.sigmoid:
            z = 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1/(1+exp(-z)), without overflow warnings
        z[invalid] = np.nan
        return z

    def describe(self) -> dict[str, Any]:
        """Provenance for outputs that carry this head's scores."""
        return {"name": self.name, "kind": self.kind, "path": self.path, "sha256": self.sha256,
                "shapes": [list(layer.weight.shape) for layer in self.layers],
                "activations": list(self.activations), "sigmoid": self.sigmoid,
                "input_standardisation": self.input_mean is not None}


@dataclass
class _Parsed:
    layers: list[Layer]
    adjacent: set[int]  # gaps with nothing between the layers in the file (consecutive Sequential indices)
    sequential_indices: tuple[int, ...] | None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    activation: str | list[str] | None = None  # what the file says, if anything
    sigmoid: bool | None = None


def _error(path: Path, message: str) -> InputError:
    return InputError(f"score head weights {path}: {message}")


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a loadable state dict"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise _error(path, f"torch.load(weights_only=True) cannot read it ({type(e).__name__}: {first}); "
                           f"save `model.state_dict()`, not the model object") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise _error(path, f"expected a state dict (a mapping of tensors), got {type(obj).__name__}")
    arrays = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise _error(path, f"key `{key}` is a {type(value).__name__}, not a tensor")
        arrays[str(key)] = value.detach().to(torch.float32).numpy()
    return arrays


def _layer(path: Path, weight: np.ndarray, bias: np.ndarray, label: str, w_key: str, b_key: str,
           torch_layout: bool) -> Layer:
    if weight.ndim != 2:
        raise _error(path, f"`{w_key}` has shape {weight.shape}, expected a 2-D weight")
    w = np.ascontiguousarray(weight.T if torch_layout else weight, dtype=np.float32)  # -> (in, out)
    if bias.shape != (w.shape[1],):
        raise _error(path, f"`{b_key}` has shape {bias.shape}, expected ({w.shape[1]},) to match `{w_key}` "
                           f"{weight.shape}")
    return Layer(w, np.asarray(bias, np.float32), label)


def _parse_torch(path: Path, sd: dict[str, np.ndarray]) -> _Parsed:
    if not sd:
        raise _error(path, "the state dict is empty")
    if set(sd) == {"weight", "bias"}:
        return _Parsed([_layer(path, sd["weight"], sd["bias"], "weight", "weight", "bias", True)], set(), None)
    norm = {k: sd.pop(k) for k in ("norm.mean", "norm.variance") if k in sd}
    if len(norm) == 1:
        raise _error(path, f"has `{next(iter(norm))}` without its pair (norm.mean and norm.variance go together)")
    prefixes, params = set(), {}
    for key in sd:
        m = _NUMBERED.match(key)
        if not m:
            raise _error(path, f"unexpected key `{key}`: expected `weight`/`bias` (nn.Linear), "
                               f"`<prefix>.<i>.weight`/`.bias` (nn.Sequential) or `<name><i>.weight`/`.bias`")
        prefixes.add(m.group(1))
        params[(int(m.group(2)), m.group(3))] = key
    if len(prefixes) > 1:
        raise _error(path, f"layers under several prefixes {sorted(prefixes)}; expected one stack of Linear layers")
    prefix = prefixes.pop()
    indices = sorted({i for i, _ in params})
    layers = []
    for i in indices:
        for part in ("weight", "bias"):
            if (i, part) not in params:
                raise _error(path, f"`{prefix}{i}.{part}` is missing")
        w_key, b_key = params[(i, "weight")], params[(i, "bias")]
        layers.append(_layer(path, sd[w_key], sd[b_key], f"{prefix}{i}", w_key, b_key, True))
    sequential = prefix == "" or prefix.endswith(".")  # nn.Sequential children are named by position
    adjacent = {g for g in range(len(indices) - 1) if sequential and indices[g + 1] == indices[g] + 1}
    parsed = _Parsed(layers, adjacent, tuple(indices) if sequential else None)
    if norm:
        dim = layers[0].weight.shape[0]
        mean, var = norm["norm.mean"].reshape(-1), norm["norm.variance"].reshape(-1)
        for key, arr in (("norm.mean", mean), ("norm.variance", var)):
            if arr.shape != (dim,):
                raise _error(path, f"`{key}` has {arr.size} values, expected {dim} (the first layer's input width)")
        if (var < 0).any():
            raise _error(path, "`norm.variance` has negative values")
        parsed.mean, parsed.std = mean.astype(np.float32), (np.sqrt(var) + NSFW_VARIANCE_EPS).astype(np.float32)
        if prefix == "linear_":  # CLIP-based-NSFW-Detector's NSFWModel_B32/L14 end in nn.Sigmoid
            parsed.sigmoid = True
    return parsed


def _parse_npz(path: Path) -> _Parsed:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001
        raise _error(path, f"np.load cannot read it as .npz ({type(e).__name__}: {e})") from e
    found: dict[tuple[str, int], np.ndarray] = {}
    for key in arrays:
        m = _NPZ_LAYER.match(key)
        if m:
            found[(m.group(1), int(m.group(2)))] = arrays[key]
        elif key not in {"sigmoid", "activation", "mean", "std"}:
            raise _error(path, f"unexpected array `{key}`: the .npz format has W0, b0, W1, b1, ... and optional "
                               f"sigmoid, activation, mean, std")
    count = max((i for _, i in found), default=-1) + 1
    if count == 0:
        raise _error(path, "no `W0`/`b0` arrays")
    layers = []
    for i in range(count):
        for letter in "Wb":
            if (letter, i) not in found:
                raise _error(path, f"`{letter}{i}` is missing (layers are W0, b0 ... W{count - 1}, b{count - 1})")
        layers.append(_layer(path, found[("W", i)], found[("b", i)], f"W{i}", f"W{i}", f"b{i}", False))
    parsed = _Parsed(layers, set(), None)
    if "sigmoid" in arrays:
        flag = arrays["sigmoid"]
        if flag.size != 1 or flag.dtype.kind not in "biu":
            raise _error(path, f"`sigmoid` is {flag.dtype} {flag.shape}, expected a 0/1 scalar")
        parsed.sigmoid = bool(flag.reshape(()))
    if "activation" in arrays:
        act = arrays["activation"]
        if act.dtype.kind != "U" or act.ndim > 1:
            raise _error(path, "`activation` must be a string or a 1-D array of strings")
        parsed.activation = str(act) if act.ndim == 0 else [str(a) for a in act]
    if ("mean" in arrays) != ("std" in arrays):
        raise _error(path, "`mean` and `std` go together")
    if "mean" in arrays:
        dim = layers[0].weight.shape[0]
        for key in ("mean", "std"):
            if arrays[key].shape != (dim,):
                raise _error(path, f"`{key}` has shape {arrays[key].shape}, expected ({dim},)")
        if not (arrays["std"] > 0).all():
            raise _error(path, "`std` must be positive")
        parsed.mean, parsed.std = arrays["mean"].astype(np.float32), arrays["std"].astype(np.float32)
    return parsed


def _check_chain(path: Path, layers: list[Layer]) -> None:
    for prev, layer in zip(layers, layers[1:]):
        if layer.weight.shape[0] != prev.weight.shape[1]:
            raise _error(path, f"`{layer.label}` takes {layer.weight.shape[0]} inputs but `{prev.label}` gives "
                               f"{prev.weight.shape[1]} outputs")
    if layers[-1].weight.shape[1] != 1:
        raise _error(path, f"the last layer `{layers[-1].label}` has {layers[-1].weight.shape[1]} outputs; "
                           f"a score head has 1")


def _activations(path: Path, parsed: _Parsed, requested: str | Sequence[str]) -> tuple[str, ...]:
    gaps = len(parsed.layers) - 1
    if isinstance(requested, str):
        if requested not in ACTIVATIONS:
            raise _error(path, f"activation `{requested}` is not one of {ACTIVATIONS}")
        return tuple("none" if g in parsed.adjacent else requested for g in range(gaps))
    acts = [str(a) for a in requested]
    if len(acts) != gaps:
        raise _error(path, f"activation lists {len(acts)} entries; {len(parsed.layers)} layers have {gaps} gaps")
    for g, act in enumerate(acts):
        if act not in ACTIVATIONS:
            raise _error(path, f"activation[{g}] `{act}` is not one of {ACTIVATIONS}")
        if act != "none" and g in parsed.adjacent:
            a, b = parsed.layers[g].label, parsed.layers[g + 1].label
            raise _error(path, f"activation[{g}] is `{act}` but `{a}` and `{b}` are consecutive nn.Sequential "
                               f"children: nothing sits between them")
    return tuple(acts)


def _sha256(path: Path) -> str:
    return digest(path, "sha256")


def load_head(kind: str, path: str | os.PathLike, name: str | None = None, *,
              activation: str | Sequence[str] | None = None, sigmoid: bool | None = None) -> MLPHead:
    """Load one head. `name` (the tag column) defaults to the file's stem.

    Raises FileNotFoundError for a missing file (`load_heads` turns that into a warning) and ValueError,
    naming the file, for anything that exists but does not fit."""
    if kind not in KINDS:
        raise ValueError(f"score head kind `{kind}` is not one of {KINDS}")
    if sigmoid is not None and not isinstance(sigmoid, (bool, np.bool_)):
        raise ValueError(f"score head sigmoid must be true or false, got {sigmoid!r}")
    path = Path(path).expanduser()
    if path.is_dir() or path.suffix == ".zip":
        raise _error(path, "looks like a Keras/autokeras model (a directory or .zip); convert it to the .npz "
                           "format, or use the torch port (see laionbuild/models/heads.py)")
    if not path.exists():
        raise MissingInputError(f"score head weights not found: {path}")
    if path.suffix == ".npz":
        parsed = _parse_npz(path)
    elif path.suffix in TORCH_SUFFIXES:
        parsed = _parse_torch(path, _read_torch(path))
    else:
        raise _error(path, f"unknown suffix `{path.suffix}`: expected .npz or a torch file ({sorted(TORCH_SUFFIXES)})")
    _check_chain(path, parsed.layers)
    if kind == "linear" and len(parsed.layers) != 1:
        raise _error(path, f"kind `linear` takes one layer, the file has {len(parsed.layers)} "
                           f"({', '.join(layer.label for layer in parsed.layers)}); use kind `mlp`")
    if kind == "improved_aesthetic":
        if parsed.sequential_indices != IMPROVED_AESTHETIC_INDICES:
            got = parsed.sequential_indices or [layer.label for layer in parsed.layers]
            raise _error(path, f"kind `improved_aesthetic` expects the published nn.Sequential layers "
                               f"{IMPROVED_AESTHETIC_INDICES}, the file has {got}; for another architecture use "
                               f"kind `mlp` with `activation`")
        if activation not in (None, "none"):
            raise _error(path, "kind `improved_aesthetic` has no activations; use kind `mlp` to choose them")
        activation = "none"
    if activation is None:
        activation = parsed.activation if parsed.activation is not None else "relu"
    if sigmoid is None:
        sigmoid = bool(parsed.sigmoid)
    return MLPHead(name=name or path.stem, kind=kind, path=str(path), sha256=_sha256(path),
                   layers=tuple(parsed.layers), activations=_activations(path, parsed, activation),
                   sigmoid=bool(sigmoid), input_mean=parsed.mean, input_std=parsed.std)


def load_heads(specs: Mapping[str, Mapping]) -> tuple[list[MLPHead], list[str]]:
    """{tag column: {kind, path, [sigmoid], [activation]}} -> (loaded heads, warnings).

    A missing weights file skips its head with a warning naming the tag and the path, so the tag
    column is absent rather than filled with a made-up score; every other problem raises."""
    heads: list[MLPHead] = []
    warnings: list[str] = []
    for tag, spec in specs.items():
        if not isinstance(spec, Mapping):
            raise ValueError(f"score head `{tag}`: expected a mapping with kind and path, got {type(spec).__name__}")
        unknown = set(spec) - SPEC_KEYS
        missing = {"kind", "path"} - set(spec)
        if unknown or missing:
            raise ValueError(f"score head `{tag}`: " + "; ".join(
                ([f"unknown option(s) {sorted(unknown)}"] if unknown else [])
                + ([f"missing {sorted(missing)}"] if missing else [])) + f" (options: {sorted(SPEC_KEYS)})")
        path = Path(str(spec["path"])).expanduser()
        if not path.exists():
            warnings.append(f"score head `{tag}`: weights file {path} not found; the `{tag}` column is skipped "
                            f"(no score is made up)")
            continue
        heads.append(load_head(str(spec["kind"]), path, name=str(tag), activation=spec.get("activation"),
                               sigmoid=spec.get("sigmoid")))
    return heads, warnings


def save_npz(head: MLPHead, path: str | os.PathLike) -> None:
    """Write `head` in the neutral .npz format, e.g. to score where torch is not installed."""
    arrays: dict[str, np.ndarray] = {"sigmoid": np.array(int(head.sigmoid))}
    for i, layer in enumerate(head.layers):
        arrays[f"W{i}"], arrays[f"b{i}"] = layer.weight, layer.bias
    if head.activations:
        arrays["activation"] = np.array(list(head.activations))
    if head.input_mean is not None and head.input_std is not None:
        arrays["mean"], arrays["std"] = head.input_mean, head.input_std
    np.savez(path, **arrays)
