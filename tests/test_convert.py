"""The convert command: weight files <-> vgg-jax checkpoints, and the round trip of our
own exports (the key mappings are tested in test_torchvision_format.py and
test_pretrained.py)."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import small_data
import torchvision_reference as reference

from vgg_jax import convert
from vgg_jax.evaluation.run import load_net
from vgg_jax.models import create_model
from vgg_jax.weights import run_checkpoint, weight_files

WIDTH_DIVISOR, FC_FEATURES = reference.WIDTH_DIVISOR, reference.FC_FEATURES
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convert(*args: str, fails: str | None = None) -> str:
    """Runs `python -m vgg_jax.convert ARGS`; returns its output, or, with `fails`, checks
    that it exits with an error line matching that pattern."""
    result = subprocess.run([sys.executable, "-m", "vgg_jax.convert", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    if fails is None:
        assert result.returncode == 0, result.stderr[-3000:]
        # The answer alone: none of orbax's checkpoint-phase lines.
        assert "orbax" not in result.stderr, result.stderr[-3000:]
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
    variables, config, _ = run_checkpoint.load_checkpoint(out)
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
             fails="^Conversion failed: .*vgg11_bn.npz holds a vgg11_bn \\(net A, with batch "
                   "norm\\) but --version=vgg11 was asked for; pass --version=vgg11_bn, or "
                   "leave --version out.$")
    _convert(bn_path, f"--out={tmp_path / 'bn'}")  # the net is read from the file
    variables, config, _ = run_checkpoint.load_checkpoint(str(tmp_path / "bn"))
    assert config.model.batch_norm
    jax.tree.map(np.testing.assert_array_equal, variables,
                 convert.from_torchvision(bn_sd, "vgg11_bn"))

    # And back to a state dict: the same arrays (batches are not counted here).
    exported = str(tmp_path / "exported.npz")
    printed = _convert(f"--workdir={tmp_path / 'bn'}", f"--out={exported}")
    assert "vgg11_bn from step 0: a narrowed vgg11_bn" in printed
    assert "Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))" in printed
    with np.load(exported) as back:
        # torchvision's keys, and the run's config recorded beside them.
        assert sorted(back.files) == sorted([*bn_sd, weight_files.RUN_CONFIG_KEY])
        for key, value in bn_sd.items():
            if not key.endswith("num_batches_tracked"):
                np.testing.assert_array_equal(back[key], value, err_msg=key)


# A run's own preprocessing and scales, unlike torchvision's (as the quickstart's are).
RUN_MEAN, RUN_STD, RUN_SCALES = (120.0, 115.0, 100.0), (60.0, 55.0, 50.0), (64, 80)


def _run_of_our_own(path: str) -> dict:
    """A tiny run's checkpoint (64-pixel crops: fc6 has a 2x2 window); its variables."""
    from configs import base

    config = base.get_config()
    config.model.version, config.model.num_classes = "A", reference.NUM_CLASSES
    config.model.width_divisor, config.model.fc_features = WIDTH_DIVISOR, FC_FEATURES
    config.data = small_data.data_config(
        mean_rgb=RUN_MEAN, std_rgb=RUN_STD, image_size=64, train_scale_min=RUN_SCALES[0],
        train_scale_max=RUN_SCALES[1], source="digits")
    variables = convert.from_torchvision(reference.state_dict("A", image_size=64), "A")
    run_checkpoint.save_variables(path, variables, config)
    return variables


def test_export_then_import_keeps_the_runs_preprocessing_and_scales(tmp_path):
    # The quickstart's round trip (issue 23): exported as .npz, imported with --version and
    # --config, the run's mean, std and scales come back (torchvision's were taken before,
    # and its evaluation gave 90% error instead of the run's).
    run = str(tmp_path / "run")
    variables = _run_of_our_own(run)
    exported = str(tmp_path / "run.npz")
    assert "the run's config (mean, std, scales) is recorded" in _convert(
        f"--workdir={run}", f"--out={exported}")
    _convert(exported, "--version=A", "--config=configs/quickstart.py",
             f"--out={tmp_path / 'from_npz'}")
    original, _ = load_net(run)
    for spec in (str(tmp_path / "from_npz"), exported):  # imported, and the file itself
        back, back_config = load_net(spec)
        assert (back.mean_rgb, back.std_rgb, back.train_scale) == (
            RUN_MEAN, RUN_STD, RUN_SCALES), spec
        assert (back.model.image_size, back.model.num_classes) == (64, reference.NUM_CLASSES)
        assert back_config.data.source == "digits"  # the digits' class names come back too
        jax.tree.map(np.testing.assert_array_equal, back.variables, variables)
    assert original.train_scale == RUN_SCALES


def test_safetensors_export_is_timms_layout_and_comes_back(tmp_path):
    run = str(tmp_path / "run")
    variables = _run_of_our_own(run)
    out = str(tmp_path / "vgg11.safetensors")
    usage = convert.export_file(run, out)
    assert "a narrowed vgg11" in usage and "recorded in the file" in usage
    state_dict = safetensors.numpy.load_file(out)
    channels = 512 // WIDTH_DIVISOR
    # timm's keys: fc6 a 2x2 convolution over the 64-pixel crop's last map, fc7 a 1x1 one.
    assert state_dict["pre_logits.fc1.weight"].shape == (FC_FEATURES, channels, 2, 2)
    assert state_dict["pre_logits.fc2.weight"].shape == (FC_FEATURES, FC_FEATURES, 1, 1)
    assert state_dict["head.fc.weight"].shape == (reference.NUM_CLASSES, FC_FEATURES)
    assert not any(key.startswith("classifier.") for key in state_dict)
    # fc6's kernel is torchvision's matrix reshaped: the (C, h, w) flatten of its inputs.
    torchvision_sd = convert.to_torchvision(variables, "A")
    np.testing.assert_array_equal(state_dict["pre_logits.fc1.weight"].reshape(FC_FEATURES, -1),
                                  torchvision_sd["classifier.0.weight"])
    back, _ = load_net(out)
    assert (back.mean_rgb, back.std_rgb, back.train_scale) == (RUN_MEAN, RUN_STD, RUN_SCALES)
    jax.tree.map(np.testing.assert_array_equal, back.variables, variables)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed")
def test_safetensors_export_loads_into_timms_own_vgg(tmp_path):
    import timm
    import torch

    sd = reference.state_dict("D", image_size=224, width_divisor=1, fc_features=64,
                              num_classes=10)
    variables = convert.from_torchvision(sd, "D")
    from configs import base

    config = base.get_config()
    config.model.version, config.model.num_classes, config.model.fc_features = "D", 10, 64
    run_checkpoint.save_variables(str(tmp_path / "run"), variables, config)
    out = str(tmp_path / "vgg16.safetensors")
    convert.export_file(str(tmp_path / "run"), out)
    net = timm.create_model("vgg16", num_classes=10, pretrained=False)
    net.pre_logits.fc1 = torch.nn.Conv2d(512, 64, 7)
    net.pre_logits.fc2 = torch.nn.Conv2d(64, 64, 1)
    net.head.fc = torch.nn.Linear(64, 10)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in
                         safetensors.numpy.load_file(out).items()}, strict=True)
    images = np.random.default_rng(0).normal(0, 1, (1, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = net.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    ours = np.asarray(create_model("D", num_classes=10, fc_features=64).apply(
        variables, images))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_export_of_a_net_torchvision_lacks_fails_in_one_line(tmp_path):
    from configs import base

    config = base.get_config()
    config.model.version = "C"
    run_checkpoint.save_variables(str(tmp_path), {"params": {"w": np.zeros(1, np.float32)}}, config)
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
