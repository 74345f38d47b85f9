"""embed.pretrained: seeded `random` weights and local checkpoints load through clip-retrieval's
own loader (all_clip), the path real pretrained weights take too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from laionbuild.models.clip import describe, resolve
from laionbuild.recipe.schema import EmbedConfig


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # random checkpoints go to ./data/.work/models


def _state(clip_model: str) -> dict:
    from all_clip import load_clip

    model, _, _ = load_clip(clip_model, use_jit=False, device="cpu")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_random_weights_are_seeded_and_labelled():
    a = resolve(EmbedConfig(model="laionbuild-tiny", pretrained="random", seed=1))
    b = resolve(EmbedConfig(model="laionbuild-tiny", pretrained="random", seed=2))
    assert a.untrained and a.clip_model.startswith("open_clip:laionbuild-tiny/")
    assert describe(a)["untrained"] is True and "UNTRAINED" in describe(a)["warning"]
    assert describe(a)["checkpoint_md5"] != describe(b)["checkpoint_md5"]
    os.remove(a.checkpoint)
    again = resolve(EmbedConfig(model="laionbuild-tiny", pretrained="random", seed=1))
    assert describe(again)["checkpoint_md5"] == describe(a)["checkpoint_md5"]


def test_local_checkpoint_loads_through_clip_retrieval(tmp_path):
    import open_clip

    from laionbuild.models.clip import register_model_configs

    register_model_configs()
    torch.manual_seed(7)
    model = open_clip.create_model("laionbuild-tiny", pretrained=None)
    path = tmp_path / "my-tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    resolved = resolve(EmbedConfig(model="laionbuild-tiny", pretrained=str(path)))
    assert not resolved.untrained and resolved.checkpoint == str(path)
    loaded = _state(resolved.clip_model)  # all_clip wraps the open_clip model as `inner_model`
    expected = model.state_dict()
    assert set(loaded) == {"inner_model." + name for name in expected}
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded["inner_model." + name], tensor)


@pytest.mark.parametrize("pretrained,message", [
    ("no_such_tag", "embed.pretrained"),
    ("/nonexistent/weights.pt", "does not exist"),
])
def test_bad_pretrained_is_refused(pretrained, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        resolve(EmbedConfig(model="laionbuild-tiny", pretrained=pretrained))


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="embed.model"):
        resolve(EmbedConfig(model="ViT-Nope", pretrained="random"))


def test_pretrained_tag_resolves_without_download():
    resolved = resolve(EmbedConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    assert resolved.clip_model == "open_clip:ViT-B-32/laion2b_s34b_b79k" and not resolved.untrained


def test_model_configs_are_registered_when_open_clip_is_first_imported():
    """What Spark's executor daemon does (laionbuild.engine.spark_daemon): nothing heavy is
    imported until a task imports open_clip, which then knows laionbuild's architectures."""
    code = ("import sys\n"
            "from laionbuild.models.clip import register_model_configs_on_import\n"
            "register_model_configs_on_import()\n"
            "assert 'open_clip' not in sys.modules and 'torch' not in sys.modules\n"
            "import open_clip\n"
            "assert 'laionbuild-tiny' in open_clip.list_models(), open_clip.list_models()[:3]\n"
            "print('registered')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "registered" in proc.stdout, proc.stderr[-3000:]
