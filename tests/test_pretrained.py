"""vgg_jax.pretrained.load: every spec form, against numpy's torchvision forward pass; the hub
through stand-ins (huggingface_hub's cache offline, a server on 127.0.0.1 via HF_ENDPOINT);
timm itself as the reference when installed."""

import importlib.util
import json
import os
import subprocess
import sys

import hub_stand_in
import jax
import numpy as np
import pytest
import safetensors.numpy
import small_data
import torchvision_reference as reference

from configs import base
from vgg_jax import pretrained
from vgg_jax.data import imagenet_classes
from vgg_jax.weights import run_checkpoint, torchvision_format, weight_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHVISION_MEAN, TORCHVISION_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
IMAGES = np.random.default_rng(5).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
# What the stand-ins' config.json says (hub_stand_in.TIMM_CONFIG), on our 0-255 scale.
TIMM_MEAN, TIMM_STD, TIMM_Q = (127.5, 102.0, 76.5), (51.0, 63.75, 76.5), 80


def _expected_logits(sd, version, mean, std, batch_norm=False):
    x = (IMAGES.astype(np.float64) - np.array(mean)) / np.array(std)
    return reference.forward(sd, version, x, batch_norm=batch_norm)["fc8"]


def _assert_close(ours, expected):
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def _python(code, **env):
    """Runs `code` in a fresh interpreter (huggingface_hub reads HF_* at import) with `env`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | env
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# Loads specs in a fresh process and writes their logits and attributes to OUT as JSON.
_LOAD = """
import json, sys
import numpy as np
from vgg_jax import pretrained
images = np.load(sys.argv[1])
report = {}
for spec in sys.argv[3:]:
    try:
        net = pretrained.load(spec)
    except ValueError as error:
        report[spec] = {"error": str(error)}
        continue
    logits = net.model.apply(net.variables, net.preprocess(images))
    report[spec] = {"logits": np.asarray(logits).tolist(), "mean": net.mean_rgb,
                    "std": net.std_rgb, "q": net.test_scale, "names": net.class_names[:2],
                    "conv1_1": np.asarray(net.variables["params"]["conv1_1"]["bias"]).tolist()}
json.dump(report, open(sys.argv[2], "w"))
"""


def _load_elsewhere(tmp_path, specs, **env):
    np.save(tmp_path / "images.npy", IMAGES)
    out = tmp_path / "report.json"
    script = _LOAD.replace("sys.argv[1]", repr(str(tmp_path / "images.npy"))).replace(
        "sys.argv[2]", repr(str(out))).replace("sys.argv[3:]", repr(list(specs)))
    _python(script, **env)
    return json.loads(out.read_text())


def test_shorthand_and_hub_spec_from_the_cache_offline(tmp_path):
    # torchvision's vgg11 as timm publishes it (narrowed, 1000 classes), in the cache that
    # huggingface_hub lays out; HF_HUB_OFFLINE=1: nothing may touch the network.
    sd = reference.state_dict("A", image_size=64, num_classes=1000)
    files = hub_stand_in.repo_files(hub_stand_in.timm_layout(sd))
    commit = hub_stand_in.write_cache(str(tmp_path / "hf"), "timm/vgg11.tv_in1k", files)
    report = _load_elsewhere(
        tmp_path, ["vgg11", f"hf-hub:timm/vgg11.tv_in1k@{commit}", "vgg16_bn"],
        HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    expected = _expected_logits(sd, "A", TIMM_MEAN, TIMM_STD)
    for spec in ("vgg11", f"hf-hub:timm/vgg11.tv_in1k@{commit}"):
        got = report[spec]
        _assert_close(np.array(got["logits"]), expected)
        # config.json's preprocessing, not torchvision's defaults.
        np.testing.assert_allclose(got["mean"], TIMM_MEAN)
        np.testing.assert_allclose(got["std"], TIMM_STD)
        assert got["q"] == TIMM_Q
        if imagenet_classes.class_names():
            assert got["names"] == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    # Not cached and offline: one sentence with the command that fetches it.
    assert report["vgg16_bn"]["error"] == (
        "hf-hub:timm/vgg16_bn.tv_in1k (model.safetensors) is not in the Hugging Face cache and "
        "the hub cannot be reached (offline, or HF_HUB_OFFLINE=1); run `hf download "
        "timm/vgg16_bn.tv_in1k model.safetensors config.json` on a connected machine with the "
        "same HF_HOME (or copy its hub cache here).")


def test_hub_download_through_hf_endpoint_with_revisions(tmp_path):
    # A server on 127.0.0.1 answering as the hub: two revisions of a timm-layout repo, and a
    # repo in torchvision's layout without timm's config.json.
    main_sd = reference.state_dict("B", image_size=64, seed=1)
    tagged_sd = reference.state_dict("B", image_size=64, seed=2)
    plain_sd = reference.state_dict("D", image_size=64, seed=3, batch_norm=True)
    repos = {
        "acme/vgg13": {"main": hub_stand_in.repo_files(hub_stand_in.timm_layout(main_sd)),
                       "v1": hub_stand_in.repo_files(hub_stand_in.timm_layout(tagged_sd))},
        "acme/plain": {"main": {"model.safetensors": safetensors.numpy.save(plain_sd)}},
    }
    home = str(tmp_path / "hf")
    specs = ["hf-hub:acme/vgg13", "hf-hub:acme/vgg13@v1", "hf-hub:acme/plain",
             "hf-hub:acme/vgg13@v2", "hf-hub:acme/other"]
    with hub_stand_in.HubServer(repos) as server:
        report = _load_elsewhere(tmp_path, specs, HF_HOME=home, HF_ENDPOINT=server.endpoint)
        downloads = [path for method, path in server.requests if method == "GET"]
    for spec, sd in zip(specs, (main_sd, tagged_sd)):
        _assert_close(np.array(report[spec]["logits"]),
                      _expected_logits(sd, "B", TIMM_MEAN, TIMM_STD))
    _assert_close(np.array(report["hf-hub:acme/plain"]["logits"]), _expected_logits(
        plain_sd, "D", TORCHVISION_MEAN, TORCHVISION_STD, batch_norm=True))
    assert report["hf-hub:acme/plain"]["q"] == 256  # torchvision's preprocessing, assumed
    assert report["hf-hub:acme/vgg13@v2"]["error"] == (
        "hf-hub:acme/vgg13@v2: the repo has no revision 'v2'.")
    assert report["hf-hub:acme/other"]["error"].startswith(
        "hf-hub:acme/other: no such model repo on the hub")
    assert "/acme/vgg13/resolve/v1/model.safetensors" in downloads
    # Downloaded once into the cache: offline, with no server, they load from there.
    report = _load_elsewhere(tmp_path, specs[:2], HF_HOME=home, HF_HUB_OFFLINE="1")
    np.testing.assert_array_equal(report["hf-hub:acme/vgg13@v1"]["conv1_1"],
                                  tagged_sd["features.0.bias"])


def _save_run(path, sd, version="A"):
    config = base.get_config()
    config.model.version, config.model.num_classes = version, reference.NUM_CLASSES
    config.model.width_divisor = reference.WIDTH_DIVISOR
    config.model.fc_features = reference.FC_FEATURES
    config.data = small_data.data_config(mean_rgb=(120.0, 115.0, 100.0),
                                         std_rgb=(60.0, 55.0, 50.0), image_size=64)
    variables = torchvision_format.from_torchvision(sd, version)
    run_checkpoint.save_variables(path, variables, config, step=7)
    return config


def test_local_files_and_runs(tmp_path):
    sd = reference.state_dict("A", image_size=64)
    expected = _expected_logits(sd, "A", TORCHVISION_MEAN, TORCHVISION_STD)
    # torchvision's keys as .safetensors and as .npz, timm's as .safetensors: each is a
    # torchvision net, so its preprocessing is torchvision's (S = Q = 256).
    paths = {"tv.safetensors": sd, "tv.npz": sd, "timm.safetensors": hub_stand_in.timm_layout(sd)}
    for name, state_dict in paths.items():
        weight_files.write(state_dict, str(tmp_path / name))
        net = pretrained.load(str(tmp_path / name))
        _assert_close(np.asarray(net.model.apply(net.variables, net.preprocess(IMAGES))),
                      expected)
        np.testing.assert_allclose((net.mean_rgb, net.std_rgb),
                                   (TORCHVISION_MEAN, TORCHVISION_STD), err_msg=name)
        assert (net.image_size, net.train_scales, net.test_scale, net.step) == (
            64, (256, 256), 256, 0)
        assert net.class_names == tuple(f"class {i}" for i in range(10))
    # A run's workdir: its own preprocessing and scales, its step; DIR@STEP names a step.
    config = _save_run(str(tmp_path / "run"), sd)
    for spec in (str(tmp_path / "run"), f"{tmp_path / 'run'}@7", f"{tmp_path / 'run'}@latest"):
        net = pretrained.load(spec)
        assert (net.mean_rgb, net.std_rgb, net.train_scales, net.step) == (
            tuple(config.data.mean_rgb), tuple(config.data.std_rgb), (40, 40), 7)
        jax.tree.map(np.testing.assert_array_equal, net.variables,
                     torchvision_format.from_torchvision(sd, "A"))
    with pytest.raises(ValueError, match=r"Step 8 is not in .*available steps: \[7\]"):
        pretrained.load(f"{tmp_path / 'run'}@8")
    with pytest.raises(ValueError, match=r"A step \(3\) applies to a run's workdir, not to vgg16"):
        pretrained.load("vgg16", step=3)
    with pytest.raises(ValueError, match="has 4 conv kernels .*Is it a VGG"):
        weight_files.write({f"features.{i}.weight": np.zeros((1, 1, 3, 3), np.float32)
                            for i in range(4)}, str(tmp_path / "four.safetensors"))
        pretrained.load(str(tmp_path / "four.safetensors"))


def test_the_trunk_alone_gives_named_features(tmp_path):
    # include_head=False: torchvision's features[:k] outputs by name, at any input size,
    # with no head variables (the perceptual-loss use).
    sd = reference.state_dict("E", image_size=64, seed=4)
    weight_files.write(hub_stand_in.timm_layout(sd), str(tmp_path / "vgg19.safetensors"))
    trunk = pretrained.load(str(tmp_path / "vgg19.safetensors"), include_head=False)
    assert not {"fc6", "fc7", "fc8"} & set(trunk.variables["params"]) and not trunk.class_names
    images = np.random.default_rng(6).integers(0, 256, (1, 96, 80, 3), dtype=np.uint8)
    names = ("conv1_2", "conv2_2", "conv3_4", "conv4_4")
    ours = trunk.model.apply(trunk.variables, trunk.preprocess(images), outputs=names)
    x = (images.astype(np.float64) - np.array(TORCHVISION_MEAN)) / np.array(TORCHVISION_STD)
    expected = reference.forward(sd, "E", x, head=False)
    for name in names:
        _assert_close(np.asarray(ours[name]), expected[name])
    pooled = pretrained.load(str(tmp_path / "vgg19.safetensors"), include_head=False,
                             pooling="avg")
    assert pooled.model.apply(pooled.variables, pooled.preprocess(images)).shape == (1, 32)
    with pytest.raises(ValueError, match="pass include_head=False with it"):
        pretrained.load(str(tmp_path / "vgg19.safetensors"), pooling="avg")


def test_centre_crop_is_evaluations_single_crop_view(tmp_path):
    from vgg_jax.data import testing, transforms

    weight_files.write(reference.state_dict("A", image_size=64), str(tmp_path / "a.npz"))
    net = pretrained.load(str(tmp_path / "a.npz"))
    data = testing.encode(testing.smooth_image(np.random.default_rng(0), 300, 400), "JPEG")
    view = net.centre_crop(data)
    assert view.shape == (64, 64, 3) and view.dtype == np.uint8
    np.testing.assert_array_equal(view, transforms.centre_view(data, 256, 64))


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed")
def test_logits_match_timms_own_vgg(tmp_path):
    # timm's vgg11 (random init, full size) saves its own state dict; we load the file.
    import timm
    import torch

    torch.manual_seed(0)
    net = timm.create_model("vgg11", pretrained=False).eval()
    path = str(tmp_path / "vgg11.safetensors")
    safetensors.numpy.save_file({k: v.numpy() for k, v in net.state_dict().items()}, path)
    ours = pretrained.load(path)
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    x = np.asarray(ours.preprocess(images))
    with torch.no_grad():
        theirs = net(torch.from_numpy(np.array(x.transpose(0, 3, 1, 2)))).numpy()
    _assert_close(np.asarray(ours.model.apply(ours.variables, x)), theirs)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="torch and torchvision not installed")
def test_pth_matches_torchvisions_own_vgg(tmp_path):
    # torchvision's vgg11_bn (random init, running statistics moved off 0 and 1), saved
    # with torch.save as its downloads are; read with torch.load(weights_only=True).
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.vgg11_bn().eval()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = str(tmp_path / "vgg11_bn.pth")
    torch.save(net.state_dict(), path)
    ours = pretrained.load(path)
    assert ours.model.batch_norm and ours.test_scale == 256
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    x = np.asarray(ours.preprocess(images))
    with torch.no_grad():
        theirs = net(torch.from_numpy(np.array(x.transpose(0, 3, 1, 2)))).numpy()
    _assert_close(np.asarray(ours.model.apply(ours.variables, x)), theirs)
