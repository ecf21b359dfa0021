"""init_from and fine-tuning: which layers are copied (and why the others are not), the
inherited preprocessing, frozen layers, and the whole fine-tuning command end to end from a
converted state dict."""

import os
import shlex
import subprocess
import sys

import hub_stand_in
import jax
import numpy as np
import pytest
import safetensors.numpy
import torchvision_reference as reference

from configs import base, finetune, quickstart
from vgg_jax import convert, models
from vgg_jax.config_checks import ConfigError
from vgg_jax.data import testing
from vgg_jax.runtime import parallel
from vgg_jax.training import loop, optim, warm_start
from vgg_jax.training.state import create_train_state
from vgg_jax.training.step import jit_train_step
from vgg_jax.weights import run_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = np.zeros((1, 32, 32, 3), np.float32)
TORCHVISION_MEAN = (123.675, 116.28, 103.53)


def _small(config, version="A", batch_norm=False, num_classes=10):
    config.model.version = version
    config.model.width_divisor, config.model.fc_features = 16, 32
    config.model.num_classes = num_classes
    config.model.batch_norm = batch_norm
    config.model.compute_dtype = "float32"
    return config


def _params(config, seed):
    return models.create_model_from_config(config).init(jax.random.key(seed), IMAGES)


def test_from_net_a_into_a_deeper_net_the_papers_layers_by_default():
    config = _small(quickstart.get_config())
    source = _params(config, 1)["params"]
    config.model.version = "D"
    target = _params(config, 2)["params"]
    new, copied, skipped = warm_start.copy_layers(
        target, source, (), source_version="A", version="D")
    assert tuple(copied) == warm_start.PAPER_LAYERS
    # conv4_1 has equal shapes in A and D, but the paper did not copy it.
    assert skipped["conv4_1"].startswith("equal shapes, but not one of the paper's layers")
    assert skipped["conv1_2"] == "not in the source net"
    assert set(skipped) | set(copied) == set(target)
    for name in target:
        expected = source[name] if name in copied else target[name]
        jax.tree.map(np.testing.assert_array_equal, new[name], expected)

    # The same net (another scale, another head): every layer of equal shape.
    _, copied, skipped = warm_start.copy_layers(
        source, _params(_small(quickstart.get_config(), num_classes=3), 3)["params"], (),
        source_version="A", version="A")
    assert "fc8" not in copied and skipped == {"fc8": "new head: 3 classes in the source, "
                                                        "10 here"}
    # An explicit choice wins, and must exist in both nets.
    _, copied, skipped = warm_start.copy_layers(target, source, ["conv1_1"],
                                                       source_version="A", version="D")
    assert copied == ["conv1_1"] and skipped["fc6"] == "not in config.init_from_layers"
    with pytest.raises(ConfigError, match="conv1_2"):
        warm_start.copy_layers(target, source, ("conv1_2",))


def test_batch_norm_follows_its_conv_and_the_other_family_is_refused():
    config = _small(quickstart.get_config(), batch_norm=True)
    shapes = jax.eval_shape(models.create_model_from_config(config).init,
                            jax.random.key(0), IMAGES)["params"]
    source = jax.tree.map(lambda s: np.full(s.shape, 7.0, np.float32), shapes)
    target = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    new, copied, _ = warm_start.copy_layers(target, source, ("conv1_1", "fc8"))
    assert copied == ["conv1_1", "conv1_1_bn", "fc8"]
    assert float(new["conv1_1_bn"]["scale"][0]) == 7 and float(new["conv2_1_bn"]["scale"][0]) == 0
    plain = _params(_small(quickstart.get_config()), 0)["params"]
    with pytest.raises(ConfigError, match="with batch norm and this one is not; pass "
                       "--config.model.batch_norm=True"):
        warm_start.copy_layers(plain, source, ())


def test_a_warm_start_that_copies_nothing_is_an_error(tmp_path, monkeypatch):
    wide = _small(quickstart.get_config())
    run_checkpoint.save_variables(str(tmp_path / "wide"), _params(wide, 0), wide)
    config = _small(quickstart.get_config())
    # Another width and FC size (the converted vgg11 into the quickstart's net):
    # no layer has the same shapes.
    config.model.width_divisor, config.model.fc_features = 8, 64
    config.init_from = str(tmp_path / "wide")
    nothing = (r"shares no layer with this net \(net A, width / 8.*conv1_1: shapes differ.*"
               r"configs/finetune.py")
    fresh = _params(config, 1)
    with pytest.raises(ConfigError, match=nothing):
        warm_start.initialise(config, fresh["params"], {})
    # The same, from the shapes alone, before any work: a training run stops before its
    # net and optimiser state are built.
    with pytest.raises(ConfigError, match=nothing):
        warm_start.check_warm_start(config)
    testing.write_folder(str(tmp_path / "data"), {"train": 2, "val": 1}, size=(40, 40))
    config.data.source, config.data.data_dir = "folder", str(tmp_path / "data")
    config.train.batch_size, config.wandb.mode = 4, "disabled"

    def build_state(*args):
        raise AssertionError("the train state was built")

    monkeypatch.setattr(loop, "create_train_state", build_state)
    with pytest.raises(ConfigError, match=nothing):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    config.model.width_divisor, config.model.fc_features = 16, 32
    warm_start.check_warm_start(config)
    _, _, lines = warm_start.initialise(config, _params(config, 1)["params"], {})
    assert lines[0].startswith(f"Initialised from {tmp_path / 'wide'} (step 0): copied conv1_1")
    # Freezing a layer the source does not provide (here a new head) is refused too.
    config.model.num_classes = 3
    config.train.frozen_layers = ("conv*", "fc8")
    unprovided = (r"freezes fc8, which config.init_from does not provide \(fc8: new head: 10 "
                  r"classes in the source, 3 here\)")
    with pytest.raises(ConfigError, match=unprovided):
        warm_start.initialise(config, _params(config, 1)["params"], {})
    with pytest.raises(ConfigError, match=unprovided):
        warm_start.check_warm_start(config)
    # And so is freezing without a source at all.
    config.init_from = ""
    with pytest.raises(ConfigError, match="frozen_layers is set without config.init_from"):
        warm_start.resolve_config(config)


def test_init_from_takes_a_weight_file_as_it_is(tmp_path):
    # torchvision's vgg11 (narrowed, 100 classes) in timm's layout, as the hub holds it: no
    # conversion first. The net, its preprocessing and its scale come from the weights.
    state_dict = reference.state_dict("A", image_size=32, num_classes=100)
    path = str(tmp_path / "vgg11.safetensors")
    safetensors.numpy.save_file(hub_stand_in.timm_layout(state_dict), path)
    config = finetune.get_config()
    config.init_from = path
    config.data.source, config.data.cache_dir = "digits", str(tmp_path / "cache")
    lines = warm_start.resolve_config(config)
    m, d = config.model, config.data
    assert (m.version, m.width_divisor, m.fc_features, m.batch_norm, m.num_classes) == (
        "A", 16, 32, False, 10)
    assert (d.image_size, d.train_scale_min, d.train_scale_max) == (32, 256, 256)
    assert tuple(d.mean_rgb) == TORCHVISION_MEAN and "inherited from" in lines[-2]
    warm_start.check_warm_start(config)
    params, _, lines = warm_start.initialise(config, _params(config, 0)["params"], {})
    expected = convert.from_torchvision(state_dict, "vgg11")["params"]
    for name in ("conv1_1", "conv5_2", "fc6", "fc7"):
        jax.tree.map(np.testing.assert_array_equal, params[name], expected[name])
    assert lines[-1] == "Not copied: fc8, new head: 100 classes in the source, 10 here."
    # What cannot be loaded is one sentence, before any work.
    with pytest.raises(ConfigError, match=r"^config.init_from='.*nothing.pth': Weight file "
                       r".*nothing.pth does not exist.$"):
        warm_start.check_path(str(tmp_path / "nothing.pth"))
    with pytest.raises(ConfigError, match=r"Checkpoint path .*nothing does not exist; pass a "
                       r"run's directory \(DIR or DIR@STEP\), a .safetensors, .npz"):
        warm_start.check_path(str(tmp_path / "nothing"))
    config.init_from = str(tmp_path / "broken.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not really")
    with pytest.raises(ConfigError, match="broken.safetensors is not a readable safetensors"):
        warm_start.check_warm_start(config)


def test_resolve_takes_the_net_and_preprocessing_from_the_source(tmp_path):
    source = _small(base.get_config(), version="B", batch_norm=True)
    source.data.image_size = 64
    source.data.mean_rgb, source.data.std_rgb = TORCHVISION_MEAN, (58.4, 57.1, 57.4)
    run_checkpoint.save_variables(str(tmp_path / "src"), {"params": {}}, source)

    config = finetune.get_config()
    with pytest.raises(ConfigError, match="config.model.version is unset.*--config.init_from"):
        warm_start.resolve_config(config)
    config.init_from = str(tmp_path / "src")
    config.data.source, config.data.cache_dir = "digits", str(tmp_path / "cache")
    lines = warm_start.resolve_config(config)
    assert (config.model.version, config.model.batch_norm, config.data.image_size) == ("B", True, 64)
    assert config.model.num_classes == 10  # the digits
    assert tuple(config.data.mean_rgb) == TORCHVISION_MEAN
    assert "inherited from" in lines[1]
    # The command line wins over the source's preprocessing, and the log says so.
    config = quickstart.get_config()
    config.init_from = str(tmp_path / "src")
    lines = warm_start.resolve_config(config, {"data.mean_rgb"})
    assert tuple(config.data.mean_rgb) == (79.01, 79.01, 79.01)
    assert tuple(config.data.std_rgb) == (58.4, 57.1, 57.4)
    assert lines == [f"Preprocessing mean_rgb=(79.01, 79.01, 79.01), std_rgb=(58.4, 57.1, 57.4): "
                     f"data.mean_rgb from the command line (the weights of {tmp_path / 'src'} "
                     "were trained with mean_rgb=(123.675, 116.28, 103.53))."]


def test_frozen_layers_and_their_batch_norm_do_not_move():
    config = _small(quickstart.get_config(), batch_norm=True)
    config.train.frozen_layers = ("conv1_*", "conv2_1")
    config.train.weight_decay = 0.1  # would shrink a frozen kernel at once if it reached it
    model = models.create_model_from_config(config)
    assert model.frozen_parameters == ("conv1_1", "conv2_1", "conv1_1_bn", "conv2_1_bn")
    mesh = parallel.create_mesh()
    tx = optim.create_optimizer(config.train, frozen=model.frozen_parameters)
    state = create_train_state(model, tx, 0, mesh)
    before = jax.device_get((state.params, state.batch_stats))
    step = jit_train_step(model, config.data)
    rng = np.random.default_rng(0)
    for i in range(2):
        batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
                 "label": rng.integers(0, 10, 8).astype(np.int32),
                 "rgb_shift": np.zeros((8, 3), np.float32), "mask": np.ones(8, bool)}
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
        if i == 0:
            first_params, first_grad_norm = jax.device_get((state.params, metrics["grad_norm"]))
    # train/grad_norm is the norm of the trained groups' gradients: the first step (its
    # momentum buffer empty) moved each trained parameter p by -lr * (gradient + wd * p).
    lr, wd = config.train.learning_rate, config.train.weight_decay
    trained_grads = [(p - q) / lr - wd * p for name in first_params
                     if name not in model.frozen_parameters
                     for p, q in zip(jax.tree.leaves(before[0][name]),
                                     jax.tree.leaves(first_params[name]))]
    expected = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in trained_grads))
    np.testing.assert_allclose(first_grad_norm, expected, rtol=1e-3)
    params, stats = jax.device_get((state.params, state.batch_stats))
    for name in params:
        same = name in model.frozen_parameters
        moved = any(not np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(params[name]), jax.tree.leaves(before[0][name])))
        assert moved != same, name
    for name in stats:
        same = name in model.frozen_parameters
        assert np.array_equal(stats[name]["mean"], before[1][name]["mean"]) == same, name
    with pytest.raises(ValueError, match="'conv9' names no layer of net A"):
        models.select_layers(("conv9",), "A")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return dict(env, JAX_PLATFORMS="cpu", WANDB_MODE="disabled")


def _run(args):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_env())


def test_finetune_command_from_a_converted_state_dict(tmp_path):
    """configs/finetune.py on the digits from a (random-weight) torchvision vgg11 with 100
    classes: new head, frozen trunk, inherited preprocessing; then convert's printed
    evaluation command, as printed but for the data flags."""
    state_dict = reference.state_dict("A", image_size=32, num_classes=100)
    npz = str(tmp_path / "vgg11.npz")
    np.savez(npz, **state_dict)
    converted = str(tmp_path / "converted")
    result = _run([sys.executable, "-m", "vgg_jax.convert", npz, "--version=vgg11",
                   f"--out={converted}"])
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.splitlines()

    workdir = str(tmp_path / "run")
    result = _run([
        sys.executable, "main.py", "--config=configs/finetune.py", f"--workdir={workdir}",
        f"--config.init_from={converted}", "--config.data.source=digits",
        f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.num_workers=0",
        "--config.data.random_flip=False", "--config.data.train_scale_min=32",
        "--config.data.train_scale_max=32",
        "--config.train.num_epochs=1", "--config.train.frozen_layers=conv*",
        "--config.progress_bar=False"])
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "inherited from" in log and "std_rgb=(58.395, 57.12, 57.375)" in log
    assert "Not copied: fc8, new head: 100 classes in the source, 10 here." in log
    variables, config, _ = run_checkpoint.load_checkpoint(workdir, "latest")
    assert config.model.num_classes == 10 and tuple(config.data.mean_rgb) == TORCHVISION_MEAN
    source = convert.from_torchvision(state_dict, "A")["params"]
    for name, group in variables["params"].items():
        frozen = name.startswith("conv")
        same = all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(group), jax.tree.leaves(source[name]))) if name != "fc8" else False
        assert same == frozen, name
    # Its evaluation: the same config, the net taken from the run (no init_from needed).
    result = _run([sys.executable, "main.py", "--config=configs/finetune.py",
                   f"--workdir={workdir}", "--mode=eval", "--config.data.source=digits",
                   f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.num_workers=0",
                   "--config.progress_bar=False"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "single_crop" in result.stdout and f"From {workdir}: model.version='A'" in result.stderr

    # convert's printed evaluation command, with its data flags swapped for a folder.
    command = shlex.split(printed[1])
    assert command[-1] == "--config.data.data_dir=$HOME/tensorflow_datasets"
    for split in ("train", "val"):
        for label in range(100):
            (tmp_path / "folder" / split / f"c{label:03d}").mkdir(parents=True)
        (tmp_path / "folder" / split / "c007" / "x.png").write_bytes(reference_png())
    result = _run([sys.executable if c == "python" else c for c in command[:-1]] + [
        "--config.data.source=folder", f"--config.data.data_dir={tmp_path / 'folder'}"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "single_crop" in result.stdout


def reference_png():
    from vgg_jax.data.testing import png_bytes

    return png_bytes(np.full((40, 48, 3), 128, np.uint8))
