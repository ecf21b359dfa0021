"""The analytic FLOP count (vgg_jax.models.flops) and the train-step benchmark (smoke runs on CPU).

No timing is asserted: CI machines are shared and slow. The benchmark runs as a
subprocess, exactly as a user runs it, at shapes that take seconds.
"""

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from vgg_jax.models import create_model, flops

# Forward multiply-accumulates at 224x224, in units of 1e9 (paper notes, docs/paper.md).
PAPER_GMACS = {"A": 7.61, "A_LRN": 7.61, "B": 11.31, "C": 11.77, "D": 15.47, "E": 19.63}

# VGG-16 (D) written out by hand, independently of models.ARCHITECTURES: per block, the
# output channels of its 3x3 convolutions.
D_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def independent_layer_macs(image_size, blocks=D_BLOCKS, divisor=1, fc=4096, classes=1000,
                           train_size=224):
    """Per-layer MACs of a VGG with 3x3 convs, counted by hand: h*w*9*cin*cout per conv,
    a 7x7 (train_size/32) window for FC6, 1x1 for FC7/FC8; `image_size` > train_size is
    the dense evaluation (the head slides over the larger final map)."""
    macs, side, channels = {}, image_size, 3
    for b, block in enumerate(blocks, start=1):
        for i, out in enumerate(block, start=1):
            out = max(out // divisor, 1)
            macs[f"conv{b}_{i}"] = side * side * 3 * 3 * channels * out
            channels = out
        side //= 2
    window = train_size // 32
    positions = (side - window + 1) ** 2
    macs["fc6"] = positions * window * window * channels * fc
    macs["fc7"] = positions * fc * fc
    macs["fc8"] = positions * fc * classes
    return macs


@pytest.mark.parametrize("version", sorted(PAPER_GMACS))
def test_forward_macs_round_to_the_paper(version):
    macs = flops.forward_macs(create_model(version))
    assert round(macs / 1e9, 2) == PAPER_GMACS[version], macs


def test_vgg16_matches_an_independent_per_layer_count():
    model = create_model("D")
    expected = independent_layer_macs(224)
    assert flops.layer_macs(model) == expected
    assert flops.forward_macs(model) == sum(expected.values()) == 15_470_264_320
    # FC layers: 25088*4096 + 4096*4096 + 4096*1000 multiply-accumulates.
    assert expected["fc6"] + expected["fc7"] + expected["fc8"] == 123_633_664


def test_training_flops_are_six_times_forward_macs():
    model = create_model("D")
    assert flops.train_flops_per_image(model) == 6 * flops.forward_macs(model)
    assert round(flops.train_flops_per_image(model) / 1e9, 1) == 92.8


def test_narrowed_net_and_dense_evaluation_size():
    model = create_model("D", image_size=64, width_divisor=8, fc_features=128, num_classes=10)
    assert flops.layer_macs(model) == independent_layer_macs(
        64, divisor=8, fc=128, classes=10, train_size=64)
    # A 128x128 input: the paper's dense evaluation, FC6 slides over a 4x4 map (3x3 outputs).
    assert flops.layer_macs(model, 128) == independent_layer_macs(
        128, divisor=8, fc=128, classes=10, train_size=64)
    with pytest.raises(ValueError, match="at least the model's training size"):
        flops.forward_macs(model, 32)


SMALL = [
    "--config.model.width_divisor=16", "--config.model.fc_features=64", "--image_size=32",
    "--batch_size=8", "--steps=3", "--warmup=1",
]


def _run(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "benchmarks/train_step.py", *args, *SMALL, f"--json={out}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text()), result.stdout


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_train_step_benchmark_runs_on_cpu(tmp_path):
    torch_installed = importlib.util.find_spec("torch") is not None
    results, stdout = _run(
        ["--config=configs/vgg_d.py", "--compare_torch", "--notorch_compile"], tmp_path, "step")
    step = results["step"]
    for key in ("images_per_s", "images_per_s_back_to_back", "tflops", "compile_s",
                "step_s_median", "train_flops_per_image", "forward_macs_per_image"):
        assert _positive(step[key]), (key, step[key])
    assert step["batch"] == 8 and step["precision"] == "float32"
    # The tiny net counted from its own shapes, not from the paper's table.
    assert step["forward_macs_per_image"] == sum(
        independent_layer_macs(32, divisor=16, fc=64, train_size=32).values())
    assert step["mfu"] is None and "MFU               : n/a" in stdout
    if torch_installed:
        assert _positive(results["torch"]["jax_over_torch"])
    else:
        assert "torch/torchvision not importable" in stdout
        assert "not importable" in results["torch"]["skipped"]


def test_training_loop_benchmark_runs_on_cpu(tmp_path):
    results, stdout = _run(
        ["--config=configs/vgg_c.py", "--mode=loop", "--config.data.num_workers=1",
         "--jpeg_size=48x64", "--num_images=16", "--compare_torch", "--max_batch",
         "--feeders=thread,grain"],
        tmp_path, "loop")
    loop = results["loop"]
    assert list(loop["feeders"]) == ["thread", "grain"]
    for feeder in loop["feeders"].values():
        for key in ("images_per_s", "fraction_of_synthetic", "wall_s", "startup_s",
                    "on_step_s"):
            assert _positive(feeder[key]), (key, feeder[key])
        assert 0 <= feeder["blocked_fraction"] <= 1
        assert feeder["bound_by"] in ("step", "data", "transfer", "input")
    thread = loop["feeders"]["thread"]
    assert thread["depth"] == 2 and thread["feeder"] == loop["feeder"] == "thread"
    # Our thread tells the two input waits apart; the parts add up to the whole wait.
    assert thread["blocked_on_data_s"] + thread["blocked_on_transfer_s"] == pytest.approx(
        thread["blocked_on_input_s"], rel=0.05, abs=0.02)
    assert loop["feeders"]["grain"]["blocked_on_data_s"] is None
    assert _positive(results["step"]["images_per_s"])
    assert "unsupported for VGG-C" in stdout and "unsupported" in results["torch"]["skipped"]
    assert "skipped on CPU" in stdout and results["max_batch"] is None


def test_validation_benchmark_runs_on_cpu(tmp_path):
    # Training's validation, timed as the loop calls it (the quickstart: 360 digits).
    out = tmp_path / "validation.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/validation.py", "--cases=quickstart", "--repeats=1",
         f"--json={out}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())["quickstart"]
    assert figures["images"] == 360 and 0 <= figures["top1_error"] <= 1
    for key in ("first_s", "median_ms_per_image", "median_cpu_ms_per_image"):
        assert _positive(figures[key]), (key, figures[key])
    assert "quickstart: 360 images" in result.stdout
