"""The test protocols of paper 3.2 on tiny nets: views, dense maps, flips, exact counting."""

import io
import json
import logging
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import small_data

from configs import base
from vgg_jax.data import imagenet, sources, testing, transforms
from vgg_jax.evaluation import evaluator as evaluator_module
from vgg_jax.evaluation import metrics, plan, protocols, results
from vgg_jax.evaluation.evaluator import EvalNet, Evaluator
from vgg_jax.evaluation.protocols import Protocol, class_probabilities
from vgg_jax.evaluation.run import load_net, run_evaluation
from vgg_jax.models import create_model
from vgg_jax.runtime import parallel
from vgg_jax.weights import run_checkpoint, torchvision_format, weight_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
MEAN = (120.0, 115.0, 100.0)
STD = (60.0, 55.0, 50.0)


def tiny_model(image_size=32, version="A"):
    return create_model(version, num_classes=NUM_CLASSES, image_size=image_size,
                        width_divisor=16, fc_features=32)


def random_params(model, seed=0):
    """He-scaled random parameters from the shapes alone (model.init takes ~10 s to compile)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, model.image_size, model.image_size, 3)))["params"]
    rng = np.random.default_rng(seed)

    def draw(s):
        fan_in = int(np.prod(s.shape[:-1])) or 1
        return (rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree.map(draw, shapes)


@pytest.fixture(scope="module")
def net():
    model = tiny_model()
    return EvalNet("A", model, {"params": random_params(model)}, MEAN, STD, (32, 32))


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [testing.smooth_image(rng, h, w, cell=4) for h, w in sizes]


def evaluator(nets, images, labels=None, *, protocol="single_crop", scales=(32,), batch_size=8,
              multi_crop_grid=5, flip=True):
    labels = labels if labels is not None else np.arange(len(images)) % NUM_CLASSES
    source = images if isinstance(images, testing.ArrayImages) else testing.ArrayImages(
        images, labels)
    return Evaluator(source, Protocol(protocol, scales, multi_crop_grid, flip),
                     nets[0].model.image_size, batch_size=batch_size, num_threads=0)


def run(nets, images, labels=None, **kwargs):
    return evaluator(nets, images, labels, **kwargs).run(nets, keep_probabilities=True)


def by_index(result):
    order = np.argsort(result.indices)
    return result.probabilities[order]


def test_test_scales_follow_the_paper():
    assert protocols.scales_for((256, 256)) == (256,)
    assert protocols.scales_for((256, 256), multi_scale=True) == (224, 256, 288)
    assert protocols.scales_for((256, 512)) == (384,)
    assert protocols.scales_for((256, 512), multi_scale=True) == (256, 384, 512)
    assert protocols.scales_for((256, 256), True, explicit=(300, 400)) == (300, 400)


def test_unknown_protocol_is_a_clear_error(net):
    with pytest.raises(ValueError, match="config.eval.protocol"):
        protocols.components("ten_crop")
    with pytest.raises(ValueError, match="smaller than the crop"):
        run([net], random_images([(32, 32)]), scales=(16,))


@pytest.mark.parametrize("image_size,height,width", [(32, 64, 96), (64, 96, 160), (64, 64, 64)])
def test_dense_score_map_shape(image_size, height, width):
    model = tiny_model(image_size)
    params = {"params": random_params(model)}
    scores = jax.eval_shape(
        lambda x: model.apply(params, x, dense=True), jnp.zeros((2, height, width, 3)))
    window = image_size // 32
    assert scores.shape == (2, height // 32 - window + 1, width // 32 - window + 1, NUM_CLASSES)


def _reference_probabilities(net, views):
    return np.stack([class_probabilities(
        net.model, MEAN, STD, False, net.variables, jnp.asarray(view)[None, None])[0]
        for view in views])


def test_dense_equals_single_crop_when_rescaled_to_image_size(net):
    # At Q = 32, 32x32 images need no resampling: both protocols see the same pixels.
    images = random_images([(32, 32)] * 3, seed=2)
    single = run([net], images, protocol="single_crop")
    dense = run([net], images, protocol="dense", flip=False)
    np.testing.assert_allclose(by_index(dense), by_index(single), rtol=1e-6, atol=1e-7)
    # Square images of any size rescale to exactly 32 x 32: dense sees the whole image
    # rescaled, single crop the validation view of training (one resampled window).
    images = random_images([(48, 48), (64, 64), (40, 40)])
    dense = run([net], images, protocol="dense", flip=False)
    expected = _reference_probabilities(
        net, [testing.rescale_shorter_side(image, 32) for image in images])
    np.testing.assert_allclose(by_index(dense), expected, rtol=1e-5, atol=1e-7)
    single = run([net], images, protocol="single_crop")
    expected = _reference_probabilities(
        net, [transforms.centre_view(testing.png_bytes(image), 32, 32) for image in images])
    np.testing.assert_allclose(by_index(single), expected, rtol=1e-5, atol=1e-7)
    # And the on-device core agrees with a plain forward pass.
    view = jnp.asarray(random_images([(32, 32)])[0])[None]
    x = (view.astype(jnp.float32) - jnp.asarray(MEAN)) / jnp.asarray(STD)
    expected = jax.nn.softmax(net.model.apply(net.variables, x))
    got = class_probabilities(net.model, MEAN, STD, False, net.variables, view[:, None])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_flip_averaging_is_symmetric(net):
    image = random_images([(64, 96)])[0]
    views = jnp.asarray(np.stack([image, image[:, ::-1]]))[:, None]
    probs = class_probabilities(net.model, MEAN, STD, True, net.variables, views)
    np.testing.assert_allclose(probs[0], probs[1], rtol=1e-5, atol=1e-7)
    # Whole protocols on mirrored images (sizes whose crops and grids are mirror-symmetric).
    images = random_images([(64, 96), (32, 64), (96, 64)], seed=1)
    mirrored = [np.ascontiguousarray(x[:, ::-1]) for x in images]
    for protocol in ("dense", "multi_crop"):
        a = run([net], images, protocol=protocol, multi_crop_grid=3, scales=(32, 64))
        b = run([net], mirrored, protocol=protocol, multi_crop_grid=3, scales=(32, 64))
        np.testing.assert_allclose(by_index(a), by_index(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grid", [1, 3, 5])
def test_multi_crop_makes_grid_squared_times_two_crops(grid):
    image = random_images([(40, 56)])[0]
    views = transforms.protocol_views(image, "multi_crop", 32, grid)
    assert views.shape == (2 * grid * grid, 32, 32, 3)
    assert len(transforms.protocol_views(image, "multi_crop", 32, grid, flip=False)) == grid**2
    np.testing.assert_array_equal(views[grid * grid:], views[: grid * grid, :, ::-1])
    if grid > 1:  # The grid spans the image: first crop top-left, last bottom-right.
        np.testing.assert_array_equal(views[0], image[:32, :32])
        np.testing.assert_array_equal(views[grid * grid - 1], image[-32:, -32:])


def test_multi_crop_feeds_every_crop_to_the_net(net):
    images = random_images([(40, 56), (48, 48)])
    maker = plan.ViewMaker(testing.ArrayImages(images, [0, 1]), np.arange(2),
                           Protocol("multi_crop", (40,), 5, True), "multi_crop", 40, 32, (32, 32))
    example = maker(0)
    assert example["views"].shape == (50, 32, 32, 3)
    views = jnp.asarray(example["views"])[None]
    got = class_probabilities(net.model, MEAN, STD, False, net.variables, views)
    per_crop = [class_probabilities(net.model, MEAN, STD, False, net.variables,
                                             views[:, i : i + 1]) for i in range(50)]
    np.testing.assert_allclose(got, np.mean(per_crop, axis=0), rtol=1e-5, atol=1e-7)


def test_odd_split_is_counted_exactly_once(net):
    # 13 images on 4 devices with 8-image batches, mixed sizes (several dense buckets).
    sizes = [(32 + 8 * (i % 5), 32 + 16 * (i % 3)) for i in range(13)]
    images = random_images(sizes)
    labels = np.random.default_rng(3).integers(0, NUM_CLASSES, 13)
    assert jax.device_count() == 4
    for protocol in protocols.PROTOCOLS:
        result = run([net], images, labels, protocol=protocol, multi_crop_grid=2,
                     scales=(32, 48))
        assert sorted(result.indices.tolist()) == list(range(13))
        assert all(row.images == 13 for row in result.rows), result.rows
    # The errors equal a reference computed one image at a time.
    result = run([net], images, labels, protocol="single_crop", scales=(40,))
    # The validation view of training.
    probs = _reference_probabilities(net, [
        transforms.centre_view(testing.png_bytes(image), 40, 32) for image in images])
    np.testing.assert_allclose(by_index(result), probs, rtol=1e-5, atol=1e-7)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :5] == labels[:, None]
    top1, top5 = top[:, 0].sum(), top.any(axis=1).sum()
    row = result.rows[0]
    assert row.top1_error == pytest.approx(100 * (1 - top1 / 13))
    assert row.top5_error == pytest.approx(100 * (1 - top5 / 13))


def test_undecodable_images_are_reported_not_counted(net):
    images = random_images([(32, 32)] * 3)
    source = testing.ArrayImages(images + [b"not an image"], [0, 1, 2, 3])
    result = evaluator([net], source, scales=(32,), batch_size=4, protocol="dense").run([net])
    assert result.undecodable == 1
    assert result.rows[0].images == 3


def test_undecodable_and_padding_rows_are_masked_zero_views(caplog):
    source = [{"image": b"not an image", "label": 3, "name": "junk.JPEG"}]
    maker = plan.ViewMaker(source, np.arange(1), Protocol("single_crop", (40,), flip=False),
                           "single_crop", 40, 32, (32, 32))
    with caplog.at_level(logging.WARNING):
        garbage, pad = maker(0), maker(-1)
    for example in (garbage, pad):
        assert not example["mask"] and example["views"].shape == (1, 32, 32, 3)
        assert not example["views"].any()
    assert garbage["label"] == 3 and pad["row"] == -1
    assert "junk.JPEG" in caplog.text


@pytest.mark.parametrize("process_count,batch_size", [(1, 4), (2, 4), (3, 6)])
def test_validation_plan_counts_every_example_exactly_once(tmp_path, process_count, batch_size):
    # The single-crop pass of training's validation, read from an odd folder split (9 images
    # whose grey level is their id) by each of several processes.
    root = str(tmp_path / "grey_ids")
    testing.write_folder(root, {"train": 1, "val": 5}, grey_ids=True)
    os.unlink(os.path.join(root, "val", "dog", "004.png"))
    source = sources.make_source(small_data.data_config(source="folder", data_dir=root), "val")
    protocol = Protocol("single_crop", (40,), flip=False)
    keys = plan.uniform_keys(len(source), (32, 32), process_count)
    num_batches, ids = set(), []
    for p in range(process_count):
        [bucket] = plan.plan_buckets(keys, {(32, 32): 1}, batch_size, 1, process_count, p)
        maker = plan.ViewMaker(source, plan.local_indices(len(source), p, process_count),
                               protocol, "single_crop", 40, 32, bucket.shape)
        batches = list(plan.view_batches(maker, bucket, 0))
        num_batches.add(len(batches))
        for b in batches:
            assert b["views"].shape == (batch_size // process_count, 1, 32, 32, 3)
        ids += [testing.grey_id(v) for b in batches for v, m in zip(b["views"], b["mask"]) if m]
    assert num_batches == {math.ceil(math.ceil(9 / process_count) / (batch_size // process_count))}
    assert sorted(ids) == list(range(9))


def test_plan_gives_every_process_the_same_batches():
    # Three processes with unequal shares of three shapes.
    rng = np.random.default_rng(0)
    shapes = np.array([(32, 32), (32, 64), (64, 32)])
    total, process_count = 23, 3
    per_process = [len(range(p, total, process_count)) for p in range(process_count)]
    keys = np.full((process_count, max(per_process), 2), -1)
    for p, n in enumerate(per_process):
        keys[p, :n] = shapes[rng.integers(0, 3, n)]
    costs = {tuple(s): int(s[0] * s[1] // 1024) for s in shapes}
    plans = [plan.plan_buckets(keys, costs, 6, 3, process_count, p)
             for p in range(process_count)]
    for p, buckets in enumerate(plans):
        assert [(b.shape, b.num_batches, b.local_batch) for b in buckets] == \
               [(b.shape, b.num_batches, b.local_batch) for b in plans[0]]
        rows = np.concatenate([b.rows for b in buckets])
        assert sorted(rows[rows >= 0].tolist()) == list(range(per_process[p]))
        for b in buckets:
            assert all(tuple(keys[p, r]) == b.shape for r in b.rows[b.rows >= 0])


def test_dense_buckets_compile_once_per_shape(net):
    # Rescaled at Q=32: 32x32 (3 images), 32x64 (5), 64x32 (4) -> three shapes, each spread
    # over several padded batches.
    sizes = [(32, 32)] * 3 + [(40, 80)] * 5 + [(64, 32)] * 4
    result = run([net], random_images(sizes), protocol="dense", batch_size=8)
    assert result.buckets == (("dense", 32, 3),)
    assert result.compilations == 3
    # A second scale adds only its new shapes (64x64, 64x128, 128x64).
    result = run([net], random_images(sizes), protocol="dense", batch_size=8, scales=(32, 64))
    assert result.compilations == 6


def test_ensemble_of_one_checkpoint_equals_that_checkpoint(tmp_path, net):
    config = base.get_config()
    config.model.num_classes = NUM_CLASSES
    config.model.width_divisor, config.model.fc_features = 16, 32
    config.model.compute_dtype = "float32"
    config.data = small_data.data_config(source="folder", data_dir=str(tmp_path / "data"),
                                      eval_split="val", mean_rgb=MEAN, std_rgb=STD)
    config.eval.batch_size = 8
    config.progress_bar = False
    testing.write_folder(str(tmp_path / "data"), {"train": 1, "val": 1}, size=(40, 56),
                         classes=tuple(f"c{i}" for i in range(NUM_CLASSES)))
    workdir = str(tmp_path / "run")
    run_checkpoint.save_variables(workdir, net.variables, config)

    config.eval.protocol = "dense+multi_crop"
    config.eval.multi_crop_grid = 2
    alone = run_evaluation(config, workdir)
    with open(os.path.join(workdir, "eval_results.json")) as f:
        saved = json.load(f)
    assert tuple(results.Row.from_json(r) for r in saved["rows"]) == alone
    assert "| net | train S | test Q |" in open(os.path.join(workdir, "eval_results.md")).read()
    assert [r.protocol for r in alone] == ["dense", "multi_crop", "dense+multi_crop"]
    assert all(r.images == 10 and r.test_scales == (40,) for r in alone)

    config.eval.ensemble = (workdir,)
    ensemble = run_evaluation(config, workdir)
    assert len(ensemble) == 2 * len(alone) + 3
    for row in ensemble[-3:]:
        match = next(r for r in alone if r.protocol == row.protocol)
        assert row.top1_error == match.top1_error
        assert row.top5_error == match.top5_error
    # The same module and preprocessing share one compiled function.
    with open(os.path.join(workdir, "eval_results.json")) as f:
        assert json.load(f)["compilations"] == saved["compilations"]

    # A net trained at another S makes the paper's test scales ambiguous: asked for.
    jittered_config = config.copy_and_resolve_references()
    jittered_config.data.train_scale_max = 48
    jittered = str(tmp_path / "jittered")
    run_checkpoint.save_variables(jittered, net.variables, jittered_config)
    config.eval.ensemble = (jittered,)
    with pytest.raises(ValueError, match="config.eval.scales"):
        run_evaluation(config, workdir)
    config.eval.scales = (40,)
    assert len(run_evaluation(config, workdir)) == len(ensemble)


def test_weights_evaluate_as_their_checkpoint_does(tmp_path, net):
    # --mode=eval --weights=SPEC: a weight file is evaluated in place of a workdir's
    # checkpoint, with its own preprocessing (torchvision's for a torchvision state dict).
    testing.write_folder(str(tmp_path / "data"), {"train": 1, "val": 1}, size=(40, 56),
                         classes=tuple(f"c{i}" for i in range(NUM_CLASSES)))
    state_dict = torchvision_format.to_torchvision(net.variables, "A")
    weights = str(tmp_path / "vgg11.safetensors")
    weight_files.write(state_dict, weights)
    config = base.get_config()
    config.data = small_data.data_config(source="folder", data_dir=str(tmp_path / "data"),
                                         eval_split="val")
    config.eval.protocol, config.eval.batch_size, config.progress_bar = "single_crop", 8, False
    # The same weights as a checkpoint whose config says torchvision's preprocessing.
    described = base.get_config()
    described.model.num_classes = NUM_CLASSES
    described.model.width_divisor, described.model.fc_features = 16, 32
    described.data.image_size = 32
    described.data.mean_rgb = tuple(255 * m for m in imagenet.TORCHVISION_MEAN)
    described.data.std_rgb = tuple(255 * s for s in imagenet.TORCHVISION_STD)
    run_checkpoint.save_variables(str(tmp_path / "run"), net.variables, described)
    file_net, run_net = load_net(weights)[0], load_net(str(tmp_path / "run"))[0]
    assert (file_net.name, file_net.train_scale, file_net.step) == ("A (vgg11)", (256, 256), 0)
    assert file_net.model.image_size == 32 and file_net.version == "A"
    np.testing.assert_allclose((file_net.mean_rgb, file_net.std_rgb),
                               (run_net.mean_rgb, run_net.std_rgb))
    jax.tree.map(np.testing.assert_array_equal, file_net.variables, run_net.variables)
    from_file = run_evaluation(config, str(tmp_path / "out"), weights=weights)
    assert from_file[0].nets == ("A (vgg11)",) and from_file[0].test_scales == (256,)
    assert from_file[0].images == NUM_CLASSES
    with open(tmp_path / "out" / "eval_results.json") as f:
        assert json.load(f)["checkpoints"] == [weights]
    # The command line: the weights in place of a workdir (results in runs/eval_<name> of
    # the current directory); --weights with training names init_from instead.
    command = [sys.executable, os.path.join(ROOT, "main.py"),
               f"--config={os.path.join(ROOT, 'configs', 'quickstart.py')}",
               "--config.data.source=folder", f"--config.data.data_dir={tmp_path / 'data'}",
               "--config.eval.protocol=single_crop", "--config.progress_bar=False"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([*command, "--mode=eval", f"--workdir={weights}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "A (vgg11)" in result.stdout
    assert os.path.exists(tmp_path / "runs" / "eval_vgg11" / "eval_results.md")
    result = subprocess.run([*command, f"--weights={weights}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0 and result.stderr.strip().endswith(
        "Config error: --weights names the net to evaluate (--mode=eval); to train from "
        f"weights, pass --config.init_from={weights}.")


def test_a_batch_norm_checkpoint_evaluates_with_its_running_averages(tmp_path):
    model = create_model("A", num_classes=NUM_CLASSES, image_size=32, width_divisor=16,
                         fc_features=32, batch_norm=True)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(3)
    running = jax.tree.map(lambda s: rng.uniform(0.5, 2.0, s.shape).astype(np.float32),
                           shapes["batch_stats"])
    variables = {"params": random_params(model), "batch_stats": running}
    config = base.get_config()
    config.model.num_classes = NUM_CLASSES
    config.model.width_divisor, config.model.fc_features = 16, 32
    config.model.batch_norm = True
    config.model.compute_dtype = "float32"
    config.data.image_size = 32
    config.data.mean_rgb, config.data.std_rgb = MEAN, STD
    run_checkpoint.save_variables(str(tmp_path), variables, config)

    net, _ = load_net(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, net.variables, variables)
    views = jnp.asarray(np.stack(random_images([(32, 32)] * 2, seed=4)))[:, None]
    got = class_probabilities(net.model, MEAN, STD, False, net.variables, views)
    x = (views[:, 0].astype(jnp.float32) - jnp.asarray(MEAN)) / jnp.asarray(STD)
    np.testing.assert_allclose(got, jax.nn.softmax(model.apply(variables, x)), rtol=1e-5,
                               atol=1e-7)
    initial = jax.tree.map(jnp.asarray, model.init(jax.random.key(0), x)["batch_stats"])
    assert not np.allclose(got, jax.nn.softmax(model.apply(
        dict(variables, batch_stats=initial), x)), atol=1e-4)


def test_masked_examples_do_not_count(net):
    # The device function of every pass (training's validation included): padding and
    # undecodable images (mask False) change no sum.
    evaluator = Evaluator(testing.ArrayImages([], []), Protocol("single_crop", (32,), flip=False),
                          32, batch_size=8)
    function = evaluator.function(net, "single_crop")
    rng = np.random.default_rng(0)
    full = {"views": rng.integers(0, 256, (8, 1, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, NUM_CLASSES, 8).astype(np.int32), "mask": np.ones(8, bool)}
    half = {key: value[:4] for key, value in full.items()}
    masked = dict(full, mask=np.array([True] * 4 + [False] * 4))

    def sums(batch):
        device = parallel.shard_batch(batch, evaluator.mesh)
        _, batch_sums = function(net.variables, device["views"], device["label"], device["mask"])
        return metrics.summarize([batch_sums])

    sums_half, sums_masked = sums(half), sums(masked)
    assert sums_masked["count"] == 4
    for key in ("loss", "top1_error", "top5_error"):
        np.testing.assert_allclose(sums_masked[key], sums_half[key], rtol=1e-5)


def test_classification_sums_count_top1_and_top5():
    logits = np.array([[9.0, 8, 7, 6, 5, 4, 3], [1.0, 2, 3, 4, 5, 6, 7]], np.float32)
    labels = np.array([0, 0])
    sums = metrics.classification_sums(logits, labels, np.ones(2, np.float32))
    assert float(sums["top1_errors"]) == 1.0  # the second example is wrong at top-1
    assert float(sums["top5_errors"]) == 1.0  # and class 0 is its lowest score
    assert float(sums["count"]) == 2.0
    # Log-probabilities rank and score as their logits do (evaluation's inputs).
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    again = metrics.classification_sums(log_probs, labels, np.ones(2, np.float32))
    for key in sums:
        np.testing.assert_allclose(again[key], sums[key], rtol=1e-6)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream_type, draws_frames", [(io.StringIO, False), (_Terminal, True)])
def test_evaluation_progress_bar_is_drawn_only_on_a_terminal(monkeypatch, stream_type,
                                                             draws_frames):
    """A log file or SLURM output gets no carriage-return frames from evaluation's bar."""
    stream = stream_type()
    monkeypatch.setattr(sys, "stderr", stream)
    bar = evaluator_module._progress(10, "dense Q=36", enabled=True)
    bar.update(10)
    bar.close()
    assert bool(stream.getvalue()) == draws_frames
