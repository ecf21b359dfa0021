"""Prediction from a checkpoint on image files, with ImageNet class names."""

import json
import os
import subprocess
import sys

import hub_stand_in
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import small_data
import torchvision_reference

from configs import base
from vgg_jax import predict
from vgg_jax.data import imagenet_classes, testing, transforms
from vgg_jax.evaluation.protocols import class_probabilities
from vgg_jax.models import create_model
from vgg_jax.weights import run_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEAN, STD = (120.0, 115.0, 100.0), (60.0, 55.0, 50.0)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny 1000-class net saved as a weights-only checkpoint."""
    config = base.get_config()
    config.model.width_divisor, config.model.fc_features = 16, 32
    config.model.compute_dtype = "float32"
    config.data = small_data.data_config(mean_rgb=MEAN, std_rgb=STD)  # 32x32 crops, Q = 40
    model = create_model("A", num_classes=1000, image_size=32, width_divisor=16, fc_features=32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32),
        shapes)
    path = str(tmp_path_factory.mktemp("predict") / "run")
    run_checkpoint.save_variables(path, {"params": params}, config)
    return path, model, params


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    paths = []
    for name, size, fmt in (("a.jpg", (48, 64), "JPEG"), ("b.png", (40, 40), "PNG")):
        path = folder / name
        path.write_bytes(testing.encode(testing.smooth_image(rng, *size), fmt))
        paths.append(str(path))
    broken = folder / "broken.jpg"
    broken.write_bytes(b"not an image")
    return paths, str(broken)


def test_imagenet_class_names_are_read_from_tfds():
    names = imagenet_classes.class_names()
    if names is None:
        pytest.skip("tensorflow-datasets' label files are not installed")
    assert len(names) == 1000 and len(set(names)) == 1000
    assert imagenet_classes.short_name(names[0]) == "tench"
    assert names[281].startswith("tabby")
    assert imagenet_classes.wordnet_ids()[0] == "n01440764"


def test_predict_single_crop_matches_the_model(workdir, images):
    path, model, params = workdir
    paths, broken = images
    results = predict.predict(path, paths + [broken], top_k=5)
    assert [r["path"] for r in results] == paths + [broken]
    assert "error" in results[-1]
    for result, image_path in zip(results[:2], paths):
        predictions = result["predictions"]
        assert len(predictions) == 5
        probs = [p["probability"] for p in predictions]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        with open(image_path, "rb") as f:
            view = transforms.centre_view(f.read(), 40, 32)  # the validation view
        x = (jnp.asarray(view, jnp.float32)[None] - jnp.asarray(MEAN)) / jnp.asarray(STD)
        expected = np.asarray(jax.nn.softmax(model.apply({"params": params}, x)))[0]
        top = np.argsort(-expected)[:5]
        assert [p["class"] for p in predictions] == top.tolist()
        np.testing.assert_allclose(probs, expected[top], rtol=1e-5)
        if imagenet_classes.class_names():
            assert predictions[0]["name"] == imagenet_classes.class_names()[top[0]]


@pytest.mark.parametrize("protocol", ["dense", "multi_crop"])
def test_predict_other_protocols(workdir, images, protocol):
    results = predict.predict(workdir[0], images[0], top_k=3, protocol=protocol, scale=64)
    assert all(len(r["predictions"]) == 3 for r in results)


@pytest.mark.parametrize("protocol", ["dense", "multi_crop"])
def test_predict_honours_the_checkpoints_flip_setting(workdir, images, tmp_path, protocol):
    # A checkpoint evaluated without flips (eval.flip=False, e.g. the digits) must be
    # predicted without them: exactly the views and averaging evaluation uses.
    _, model, params = workdir
    config = base.get_config()
    config.model.width_divisor, config.model.fc_features = 16, 32
    config.model.compute_dtype = "float32"
    config.data = small_data.data_config(mean_rgb=MEAN, std_rgb=STD)
    config.eval.flip = False
    path = str(tmp_path / "no_flip")
    run_checkpoint.save_variables(path, {"params": params}, config)
    image_path = images[0][0]  # 48 x 64: not mirror-symmetric
    with open(image_path, "rb") as f:
        data = f.read()
    shape = transforms.dense_shape(48, 64, 64, 32, config.eval.dense_size_step)

    def expected(flip):
        views = transforms.image_views(data, protocol, 64, 32, config.eval.multi_crop_grid,
                                       flip, shape)
        return np.asarray(class_probabilities(
            model, MEAN, STD, flip and protocol == "dense", {"params": params},
            jnp.asarray(views)[None]))[0]

    unflipped, flipped = expected(False), expected(True)
    assert not np.allclose(unflipped, flipped, atol=1e-5)
    for run, reference in ((path, unflipped), (workdir[0], flipped)):
        got = predict.predict(run, [image_path], top_k=3, protocol=protocol, scale=64)
        top = np.argsort(-reference, kind="stable")[:3]
        assert [p["class"] for p in got[0]["predictions"]] == top.tolist()
        np.testing.assert_allclose([p["probability"] for p in got[0]["predictions"]],
                                   reference[top], rtol=1e-5)


def test_cli_prints_top_classes(workdir, images, tmp_path):
    out_json = str(tmp_path / "predictions.json")
    result = subprocess.run(
        [sys.executable, "-m", "vgg_jax.predict", f"--workdir={workdir[0]}", "--top_k=2",
         f"--json={out_json}", images[0][0]],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    # The answer alone: none of orbax's checkpoint-phase lines (43 of them before).
    assert not [line for line in result.stderr.splitlines() if "orbax" in line or
                "checkpoint" in line], result.stderr[-2000:]
    out = result.stdout.splitlines()
    assert out[0] == images[0][0]
    assert len(out) == 3 and out[1].lstrip().startswith("1.") and "%" in out[1]
    with open(out_json) as f:
        assert len(json.load(f)[0]["predictions"]) == 2
    old_flag = subprocess.run(
        [sys.executable, "-m", "vgg_jax.predict", f"--checkpoint={workdir[0]}", images[0][0]],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert old_flag.returncode != 0


def test_cli_predicts_with_hub_weights_offline(images, tmp_path):
    # --weights=vgg11: torchvision's vgg11 as timm publishes it (narrowed, random), from
    # huggingface_hub's cache with the network off; its config.json's mean, std and crop.
    sd = torchvision_reference.state_dict("A", image_size=64, num_classes=1000)
    files = hub_stand_in.repo_files(hub_stand_in.timm_layout(sd))
    hub_stand_in.write_cache(str(tmp_path / "hf"), "timm/vgg11.tv_in1k", files)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    result = subprocess.run(
        [sys.executable, "-m", "vgg_jax.predict", "--weights=vgg11", "--top_k=3",
         f"--json={tmp_path / 'out.json'}", images[0][0]], cwd=ROOT, capture_output=True,
        text=True, timeout=120,
        env=env | {"JAX_PLATFORMS": "cpu", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads((tmp_path / "out.json").read_text())[0]["predictions"]
    pre = hub_stand_in.TIMM_CONFIG["pretrained_cfg"]
    with open(images[0][0], "rb") as f:
        view = transforms.centre_view(f.read(), 80, 64)  # Q = 64 / crop_pct 0.8
    x = (view[None] / 255.0 - np.array(pre["mean"])) / np.array(pre["std"])
    logits = torchvision_reference.forward(sd, "A", x)["fc8"][0]
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    top = np.argsort(-expected)[:3]
    assert [p["class"] for p in got] == top.tolist()
    np.testing.assert_allclose([p["probability"] for p in got], expected[top], rtol=1e-4)


def test_class_names_for_small_data_sets():
    config = base.get_config()
    config.data.source = "digits"
    assert predict.class_names_for(config, 10) == [str(i) for i in range(10)]
    config.data.source = "tfds"
    assert predict.class_names_for(config, 3) == ["class 0", "class 1", "class 2"]
