"""Score heads read the published weight layouts (written here with torch, in the key layouts of the
LAION repositories) and score like the torch modules those files come from, on L2-normalised input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laionbuild.models.heads import MLPHead, ScoreHead, load_head, load_heads, save_npz


def embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    # raw (unnormalised, arbitrary scale) embeddings: the head normalises them itself
    return (np.random.default_rng(seed).normal(size=(n, dim)) * 7.0).astype(np.float32)


def reference(module: nn.Module, x: np.ndarray) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return module(F.normalize(torch.from_numpy(x), dim=-1)).numpy().reshape(-1)


class ImprovedAesthetic(nn.Module):
    """improved-aesthetic-predictor's MLP as published: the ReLUs are commented out."""

    def __init__(self, relu: bool = False):
        super().__init__()
        act = [nn.ReLU()] if relu else []
        self.layers = nn.Sequential(nn.Linear(768, 1024), *act, nn.Dropout(0.2), nn.Linear(1024, 128), *act,
                                    nn.Dropout(0.2), nn.Linear(128, 64), *act, nn.Dropout(0.1),
                                    nn.Linear(64, 16), *act, nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class H14Nsfw(nn.Module):
    """CLIP-based-NSFW-Detector / clip-retrieval H14_NSFW_Detector: the last two Linears are adjacent."""

    def __init__(self):
        super().__init__()
        dims = [1024, 1024, 2048, 1024, 256, 128, 16]
        blocks = []
        for a, b in zip(dims, dims[1:-1]):
            blocks += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.2)]
        self.layers = nn.Sequential(*blocks, nn.Linear(128, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class Normalization(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mean", torch.randn(dim) * 0.01)
        self.register_buffer("variance", torch.rand(dim) * 0.002 + 1e-4)

    def forward(self, x):
        return (x - self.mean) / (self.variance.sqrt() + 1e-10)


class NsfwL14(nn.Module):
    """CLIP-based-NSFW-Detector src/models.py NSFWModel_L14 (torch port of the autokeras model)."""

    def __init__(self):
        super().__init__()
        self.norm = Normalization(768)
        self.linear_1, self.linear_2 = nn.Linear(768, 64), nn.Linear(64, 512)
        self.linear_3, self.linear_4 = nn.Linear(512, 256), nn.Linear(256, 1)

    def forward(self, x):
        x = self.norm(x)
        for layer in (self.linear_1, self.linear_2, self.linear_3):
            x = torch.relu(layer(x))
        return torch.sigmoid(self.linear_4(x))


def test_linear_aesthetic_head_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(768, 1)  # LAION-AI/aesthetic-predictor sa_0_4_vit_l_14_linear.pth
    torch.save(model.state_dict(), tmp_path / "sa_0_4_vit_l_14_linear.pth")
    head = load_head("linear", tmp_path / "sa_0_4_vit_l_14_linear.pth", name="aesthetic_score")
    assert isinstance(head, ScoreHead) and head.name == "aesthetic_score" and head.input_dim == 768
    x = embeddings(300, 768)
    got = head.score(x)
    assert got.dtype == np.float32 and got.shape == (300,)
    np.testing.assert_allclose(got, reference(model, x), rtol=1e-5, atol=1e-5)
    # the head normalises: scale does not matter, float16 (as LAION ships embeddings) works
    np.testing.assert_allclose(head.score(x * 0.01), got, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.score(x.astype(np.float16)), got, atol=2e-3)
    assert head.describe()["sha256"] and head.describe()["shapes"] == [[768, 1]]


def test_improved_aesthetic_layout_has_no_activations(tmp_path):
    torch.manual_seed(1)
    model = ImprovedAesthetic()
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(model.state_dict(), path)
    assert sorted({k.rsplit(".", 1)[0] for k in model.state_dict()}) == [f"layers.{i}" for i in (0, 2, 4, 6, 7)]
    x = embeddings(64, 768, seed=1)
    expected = reference(model, x)
    head = load_head("improved_aesthetic", path)
    assert head.activations == ("none",) * 4 and not head.sigmoid
    np.testing.assert_allclose(head.score(x), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(load_head("mlp", path, activation="none").score(x), expected, rtol=1e-4, atol=1e-5)
    # mlp's ReLU default is a different model: the preset exists so this cannot happen silently
    assert load_head("mlp", path).activations == ("relu", "relu", "relu", "none")


def test_improved_aesthetic_refuses_other_architectures(tmp_path):
    relu_variant = ImprovedAesthetic(relu=True)  # layers.{0,3,6,9,11}: not the published file
    torch.save(relu_variant.state_dict(), tmp_path / "relu.pth")
    with pytest.raises(ValueError, match=r"relu\.pth.*\(0, 2, 4, 6, 7\).*\(0, 3, 6, 9, 11\)"):
        load_head("improved_aesthetic", tmp_path / "relu.pth")
    x = embeddings(16, 768)
    np.testing.assert_allclose(load_head("mlp", tmp_path / "relu.pth").score(x), reference(relu_variant, x),
                               rtol=1e-4, atol=1e-5)


def test_h14_nsfw_sequential_with_adjacent_linears(tmp_path):
    torch.manual_seed(2)
    model = H14Nsfw()
    torch.save(model.state_dict(), tmp_path / "h14_nsfw.pth")
    head = load_head("mlp", tmp_path / "h14_nsfw.pth", name="nsfw_score")
    assert head.activations == ("relu",) * 5 + ("none",) and not head.sigmoid
    x = embeddings(50, 1024, seed=2)
    np.testing.assert_allclose(head.score(x), reference(model, x), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"h14_nsfw\.pth.*activation\[5\].*layers\.15.*layers\.16"):
        load_head("mlp", tmp_path / "h14_nsfw.pth", activation=["relu"] * 6)


def test_nsfw_torch_port_layout_standardises_and_sigmoids(tmp_path):
    torch.manual_seed(3)
    model = NsfwL14()
    torch.save(model.state_dict(), tmp_path / "clip_ViT-L-14_openai_binary_nsfw_head.pth")
    assert {"norm.mean", "norm.variance", "linear_4.weight"} <= set(model.state_dict())
    head = load_head("mlp", tmp_path / "clip_ViT-L-14_openai_binary_nsfw_head.pth")
    assert head.sigmoid and head.activations == ("relu",) * 3
    x = embeddings(80, 768, seed=3)
    got = head.score(x)
    assert ((got >= 0) & (got <= 1)).all()
    np.testing.assert_allclose(got, reference(model, x), rtol=1e-4, atol=1e-6)
    raw = load_head("mlp", tmp_path / "clip_ViT-L-14_openai_binary_nsfw_head.pth", sigmoid=False).score(x)
    np.testing.assert_allclose(1 / (1 + np.exp(-raw)), got, rtol=1e-4, atol=1e-6)


def test_npz_format_and_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    w0, b0 = rng.normal(size=(32, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    w1, b1 = rng.normal(size=(8, 1)).astype(np.float32), rng.normal(size=1).astype(np.float32)
    np.savez(tmp_path / "head.npz", W0=w0, b0=b0, W1=w1, b1=b1, sigmoid=np.array(1))
    head = load_head("mlp", tmp_path / "head.npz", name="nsfw_score")
    x = embeddings(40, 32, seed=4)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = 1 / (1 + np.exp(-(np.maximum(xn @ w0 + b0, 0) @ w1 + b1)[:, 0]))
    np.testing.assert_allclose(head.score(x), expected, rtol=1e-5, atol=1e-6)

    np.savez(tmp_path / "lin.npz", W0=w0[:, :1], b0=b0[:1])  # linear: y = x·w + b
    np.testing.assert_allclose(load_head("linear", tmp_path / "lin.npz").score(x), (xn @ w0[:, :1] + b0[:1])[:, 0],
                               rtol=1e-5, atol=1e-6)

    torch.manual_seed(5)
    nsfw = NsfwL14()  # any loaded head converts to .npz and scores the same without torch
    torch.save(nsfw.state_dict(), tmp_path / "nsfw.pth")
    original = load_head("mlp", tmp_path / "nsfw.pth")
    save_npz(original, tmp_path / "nsfw.npz")
    converted = load_head("mlp", tmp_path / "nsfw.npz")
    assert converted.sigmoid and converted.activations == original.activations
    y = embeddings(20, 768, seed=5)
    np.testing.assert_allclose(converted.score(y), original.score(y), rtol=1e-6)


def test_load_heads_skips_missing_files_with_a_warning(tmp_path):
    torch.save(nn.Linear(768, 1).state_dict(), tmp_path / "aesthetic.pth")
    specs = {"aesthetic_score": {"kind": "linear", "path": str(tmp_path / "aesthetic.pth")},
             "nsfw_score": {"kind": "mlp", "path": str(tmp_path / "absent.pth"), "sigmoid": True}}
    heads, warnings = load_heads(specs)
    assert [h.name for h in heads] == ["aesthetic_score"]
    assert len(warnings) == 1 and "nsfw_score" in warnings[0] and str(tmp_path / "absent.pth") in warnings[0]
    with pytest.raises(ValueError, match="unknown option"):
        load_heads({"x": {"kind": "mlp", "path": str(tmp_path / "aesthetic.pth"), "sigmoyd": True}})
    with pytest.raises(ValueError, match="not one of"):
        load_heads({"x": {"kind": "svm", "path": str(tmp_path / "aesthetic.pth")}})


def _save(tmp_path, name, obj):
    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez(path, **obj)
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize("name,obj,message", [
    ("keys.pth", {"foo": torch.zeros(1, 768)}, "unexpected key `foo`"),
    ("nobias.pth", {"layers.0.weight": torch.zeros(1, 768)}, "`layers.0.bias` is missing"),
    ("bias.pth", {"weight": torch.zeros(1, 768), "bias": torch.zeros(2)}, r"`bias` has shape \(2,\)"),
    ("chain.pth", {"layers.0.weight": torch.zeros(16, 768), "layers.0.bias": torch.zeros(16),
                   "layers.2.weight": torch.zeros(1, 32), "layers.2.bias": torch.zeros(1)},
     "`layers.2` takes 32 inputs but `layers.0` gives 16"),
    ("two.pth", {"weight": torch.zeros(2, 768), "bias": torch.zeros(2)}, "has 2 outputs"),
    ("notdict.pth", [torch.zeros(1)], "expected a state dict"),
    ("w.npz", {"W0": np.zeros((768, 1)), "b1": np.zeros(1)}, "`b0` is missing"),
    ("extra.npz", {"W0": np.zeros((768, 1)), "b0": np.zeros(1), "bias": np.zeros(1)}, "unexpected array `bias`"),
    ("torchorient.npz", {"W0": np.zeros((4, 768)), "W1": np.zeros((4, 1)), "b0": np.zeros(768), "b1": np.zeros(1)},
     "`W1` takes 4 inputs but `W0` gives 768"),
])
def test_malformed_files_raise_naming_file_and_key(tmp_path, name, obj, message):
    path = _save(tmp_path, name, obj)
    with pytest.raises(ValueError, match=message) as info:
        load_head("mlp", path)
    assert str(path) in str(info.value)


def test_other_unloadable_files(tmp_path):
    torch.save(nn.Linear(768, 1), tmp_path / "module.pth")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match=r"module\.pth.*state_dict"):
        load_head("linear", tmp_path / "module.pth")
    torch.save(ImprovedAesthetic().state_dict(), tmp_path / "mlp.pth")
    with pytest.raises(ValueError, match=r"mlp\.pth.*kind `linear` takes one layer"):
        load_head("linear", tmp_path / "mlp.pth")
    (tmp_path / "clip_autokeras_binary_nsfw").mkdir()
    with pytest.raises(ValueError, match="Keras"):
        load_head("mlp", tmp_path / "clip_autokeras_binary_nsfw")
    (tmp_path / "head.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown suffix"):
        load_head("mlp", tmp_path / "head.onnx")
    with pytest.raises(FileNotFoundError):
        load_head("mlp", tmp_path / "absent.pth")


def test_score_input_checks_batching_and_degenerate_rows(tmp_path):
    torch.manual_seed(6)
    model = nn.Linear(768, 1)
    torch.save(model.state_dict(), tmp_path / "a.pth")
    head = load_head("linear", tmp_path / "a.pth", name="aesthetic_score")
    with pytest.raises(ValueError, match=r"aesthetic_score.*a\.pth.*\(N, 768\).*\(5, 512\)"):
        head.score(np.zeros((5, 512), np.float32))
    with pytest.raises(ValueError, match=r"\(768,\)"):
        head.score(np.zeros(768, np.float32))
    assert head.score(np.zeros((0, 768), np.float32)).shape == (0,)

    x = embeddings(1000, 768, seed=6)
    x[3] = 0.0
    x[7, 5] = np.nan
    before = x.copy()
    whole = head.score(x)
    np.testing.assert_array_equal(x, before)  # input untouched
    assert np.isnan(whole[[3, 7]]).all() and np.isfinite(np.delete(whole, [3, 7])).all()
    ok = np.delete(np.arange(1000), [3, 7])
    np.testing.assert_allclose(whole[ok], reference(model, x[ok]), rtol=1e-5, atol=1e-5)
    small = MLPHead(**{**head.__dict__, "batch_size": 7})
    np.testing.assert_allclose(small.score(x), whole, rtol=1e-5, atol=1e-7)  # BLAS blocking differs by ulps
