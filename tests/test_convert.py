"""The convert command: torchvision weight files <-> vgg-jax checkpoints (the mapping
itself is tested in test_torchvision_weights.py)."""

import importlib.util

import jax
import numpy as np
import pytest
import torchvision_reference as reference

from vgg_jax import checkpoint, convert

WIDTH_DIVISOR, FC_FEATURES = reference.WIDTH_DIVISOR, reference.FC_FEATURES


def test_cli_writes_a_checkpoint_with_torchvision_preprocessing(tmp_path, capsys):
    sd = reference.state_dict("A", image_size=32)
    path = str(tmp_path / "vgg11.npz")
    np.savez(path, **sd)
    out = str(tmp_path / "converted")
    convert.main([path, "--version", "vgg11", "--out", out])
    assert "--mode=eval" in capsys.readouterr().out
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
    with pytest.raises(SystemExit, match="has batch norm .*pass --config.model.batch_norm=True"):
        convert.main([bn_path, "--version", "vgg11", "--out", str(tmp_path / "wrong")])
    convert.main([bn_path, "--version", "vgg11_bn", "--out", str(tmp_path / "bn")])
    variables, config = checkpoint.load_variables(str(tmp_path / "bn"))
    assert config.model.batch_norm
    jax.tree.map(np.testing.assert_array_equal, variables,
                 convert.from_torchvision(bn_sd, "vgg11_bn"))


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch installed")
def test_pth_without_torch_names_the_fix(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"\0")
    with pytest.raises(SystemExit, match="pip install torch"):
        convert.load_state_dict(str(path))
