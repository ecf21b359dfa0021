"""The convert command: torchvision weight files <-> vgg-jax checkpoints (the mapping
itself is tested in test_torchvision_weights.py)."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torchvision_reference as reference

from vgg_jax import convert
from vgg_jax.training import checkpoint

WIDTH_DIVISOR, FC_FEATURES = reference.WIDTH_DIVISOR, reference.FC_FEATURES
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convert(*args: str, fails: str | None = None) -> str:
    """Runs `python -m vgg_jax.convert ARGS`; returns its output, or, with `fails`, checks
    that it exits with an error line matching that pattern."""
    result = subprocess.run([sys.executable, "-m", "vgg_jax.convert", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    if fails is None:
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout
    assert result.returncode != 0 and re.search(fails, result.stderr, re.MULTILINE), (
        result.stderr[-3000:])
    return result.stderr


def test_cli_writes_a_checkpoint_with_torchvision_preprocessing(tmp_path):
    sd = reference.state_dict("A", image_size=32)
    path = str(tmp_path / "vgg11.npz")
    np.savez(path, **sd)
    out = str(tmp_path / "converted")
    assert "--mode=eval" in _convert(path, "--version", "vgg11", "--out", out)
    variables, config = checkpoint.load_variables(out)
    assert config.model.version == "A" and config.data.image_size == 32
    assert (config.model.width_divisor, config.model.fc_features) == (WIDTH_DIVISOR, FC_FEATURES)
    np.testing.assert_allclose(config.data.mean_rgb, (123.675, 116.28, 103.53))
    np.testing.assert_allclose(config.data.std_rgb, (58.395, 57.12, 57.375))
    assert config.data.train_scale_min == config.data.train_scale_max == 256
    expected = convert.from_torchvision(sd, "A")
    jax.tree.map(np.testing.assert_array_equal, variables, expected)
    assert "batch_stats" not in variables and not config.model.batch_norm

    # A vgg11_bn file: the checkpoint holds its running statistics.
    bn_sd = reference.state_dict("A", image_size=32, batch_norm=True)
    bn_path = str(tmp_path / "vgg11_bn.npz")
    np.savez(bn_path, **bn_sd)
    _convert(bn_path, "--version=vgg11", f"--out={tmp_path / 'wrong'}",
             fails="has batch norm .*pass --config.model.batch_norm=True")
    _convert(bn_path, "--version=vgg11_bn", f"--out={tmp_path / 'bn'}")
    variables, config = checkpoint.load_variables(str(tmp_path / "bn"))
    assert config.model.batch_norm
    jax.tree.map(np.testing.assert_array_equal, variables,
                 convert.from_torchvision(bn_sd, "vgg11_bn"))

    # And back to a state dict: the same arrays (batches are not counted here).
    exported = str(tmp_path / "exported.npz")
    printed = _convert(f"--workdir={tmp_path / 'bn'}", f"--out={exported}")
    assert "vgg11_bn from step 0: a narrowed vgg11_bn" in printed
    assert "Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))" in printed
    with np.load(exported) as back:
        assert sorted(back.files) == sorted(bn_sd)
        for key, value in bn_sd.items():
            if not key.endswith("num_batches_tracked"):
                np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_export_of_a_net_torchvision_lacks_fails_in_one_line(tmp_path):
    from configs import base

    config = base.get_config()
    config.model.version = "C"
    checkpoint.save_variables(str(tmp_path), {"params": {"w": np.zeros(1, np.float32)}}, config)
    _convert(f"--workdir={tmp_path}", f"--out={tmp_path / 'c.pth'}",
             fails="^Conversion failed: torchvision has no VGG of configuration C")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="torch and torchvision not installed")
def test_pth_written_by_the_command_loads_into_torchvision_layers(tmp_path):
    import torch
    from torchvision.models import vgg

    sd = reference.state_dict("A", image_size=32, batch_norm=True)
    np.savez(str(tmp_path / "vgg11_bn.npz"), **sd)
    _convert(str(tmp_path / "vgg11_bn.npz"), "--version", "vgg11_bn",
             "--out", str(tmp_path / "run"))
    path = str(tmp_path / "vgg11_bn.pth")
    _convert("--workdir", str(tmp_path / "run"), "--out", path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["features.1.num_batches_tracked"].dtype == torch.int64
    # torchvision's own layer builder, at our width divisor, takes the features strictly.
    narrow = [c // WIDTH_DIVISOR if c != "M" else c for c in vgg.cfgs["A"]]
    features = vgg.make_layers(narrow, batch_norm=True)
    features.load_state_dict({k[len("features."):]: v for k, v in loaded.items()
                              if k.startswith("features.")}, strict=True)
    np.testing.assert_array_equal(features[1].running_var.numpy(), sd["features.1.running_var"])


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch installed")
def test_pth_without_torch_names_the_fix(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"\0")
    with pytest.raises(SystemExit, match="pip install torch"):
        convert.load_state_dict(str(path))
