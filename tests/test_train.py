"""The train step, evaluation sums, data parallelism and checkpoints, on small shapes."""

import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import signal
import sys
import threading
import time

import grain
import jax
import numpy as np
import pytest

from configs import quickstart
from vgg_jax import models
from vgg_jax.config_values import ConfigError
from vgg_jax.runtime import parallel, profiling
from vgg_jax.training import checkpoint, loop, optim, progress, run_state, writers
from vgg_jax.training.state import create_train_state
from vgg_jax.training.step import jit_train_step
from vgg_jax.weights import run_checkpoint

NUM_CLASSES = 10
# How long a released thread may take to finish the read it was in (grain's reader stops
# without waiting for it).
_THREAD_EXIT_S = 10.0
# How long a test waits for a run to install its signal handlers, and how often it looks.
_HANDLER_WAIT_S, _POLL_S = 120.0, 0.01


def _config():
    config = quickstart.get_config()
    config.model.width_divisor = 16
    config.model.fc_features = 32
    config.model.num_classes = NUM_CLASSES
    config.train.learning_rate = 0.01
    return config


def _batch(size=8, seed=0, image_size=32):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (size, image_size, image_size, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, size).astype(np.int32),
        "rgb_shift": rng.normal(size=(size, 3)).astype(np.float32),
        "mask": np.ones(size, bool),
    }


def _setup(config, mesh):
    model = models.create_model_from_config(config)
    tx = optim.create_optimizer(config.train)
    state = create_train_state(model, tx, config.seed, mesh)
    state = state.replace(opt_state=optim.set_learning_rate(
        state.opt_state, config.train.learning_rate))
    step = jit_train_step(model, config.data)
    return model, state, step


def test_one_step_lowers_the_loss_by_the_first_order_amount():
    """A step of plain SGD moves the parameters by -lr * g, so on the same batch the loss
    falls by lr * |g|^2 to first order. Dropout, momentum and weight decay are off so the
    loss is a function of the parameters alone; the rate is chosen to take 1% off the loss.
    Measured over 12 seeds: the fall is 0.99 +- 0.011 (0.969-1.016) of the prediction, so
    the bounds below are ~18 standard deviations away, while a wrong sign, a gradient of the
    sum instead of the mean or a rate applied twice lands far outside them."""
    config = _config()
    config.model.dropout_rate = 0.0
    config.train.momentum, config.train.weight_decay = 0.0, 0.0
    mesh = parallel.create_mesh()
    _, state, step = _setup(config, mesh)
    batch = parallel.shard_batch(_batch(), mesh)

    def loss_and_norm(metrics):
        return float(metrics["loss"] / metrics["count"]), float(metrics["grad_norm"])

    def with_rate(state, lr):
        return state.replace(opt_state=optim.set_learning_rate(state.opt_state, lr))

    state, metrics = step(with_rate(state, 0.0), batch)  # measures, moves nothing
    loss_0, grad_norm = loss_and_norm(metrics)
    lr = 0.01 * loss_0 / grad_norm**2
    state, metrics = step(with_rate(state, lr), batch)
    assert loss_and_norm(metrics)[0] == pytest.approx(loss_0, rel=1e-6)  # the same parameters
    _, metrics = step(with_rate(state, 0.0), batch)
    loss_1, _ = loss_and_norm(metrics)
    assert np.isfinite(loss_1)
    assert 0.8 < (loss_0 - loss_1) / (lr * grad_norm**2) < 1.2, (loss_0, loss_1, lr, grad_norm)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_sharded_step_equals_single_device_step(batch_norm):
    config = _config()
    config.model.dropout_rate = 0.5  # the dropout key must not depend on the sharding
    # Batch norm: the statistics of the global batch, not of each device's quarter.
    config.model.batch_norm = batch_norm
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:4]):
        mesh = parallel.create_mesh(devices)
        _, state, step = _setup(config, mesh)
        for seed in range(2):
            state, metrics = step(state, parallel.shard_batch(_batch(seed=seed), mesh))
        results.append((jax.device_get(state.variables), float(metrics["loss"])))
    (variables_1, loss_1), (variables_4, loss_4) = results
    assert len(jax.devices()) >= 4
    assert ("batch_stats" in variables_1) == batch_norm
    np.testing.assert_allclose(loss_1, loss_4, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(variables_1), jax.tree.leaves(variables_4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    if batch_norm:  # the statistics moved, and equally
        assert not np.allclose(variables_4["batch_stats"]["conv1_1_bn"]["var"], 1.0)


def test_no_recompilation_after_the_first_step():
    config = _config()
    mesh = parallel.create_mesh()
    _, state, step = _setup(config, mesh)
    for seed in range(3):
        state, _ = step(state, parallel.shard_batch(_batch(seed=seed), mesh))
        # A learning-rate cut from the host between steps must not retrace either.
        state = state.replace(opt_state=optim.set_learning_rate(state.opt_state, 1e-3 / (seed + 1)))
    assert step._cache_size() == 1


def test_the_step_counts_optimiser_steps_and_micro_batches_have_their_own_index():
    config = _config()
    config.model.dropout_rate = 0.5
    config.train.grad_accum_steps = 2
    mesh = parallel.create_mesh()
    model = models.create_model_from_config(config)
    state = create_train_state(model, optim.create_optimizer(config.train), config.seed, mesh)
    step = jit_train_step(model, config.data, grad_accum_steps=2)
    batch = parallel.shard_batch(_batch(), mesh)
    initial = jax.device_get(state.params)  # the step donates (deletes) its input state
    first, metrics_1 = step(state, batch)
    # The first micro-batch of optimiser step 1: no step done yet, parameters unchanged.
    assert (int(first.step), int(optim.micro_batch_index(first.opt_state))) == (0, 1)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(first.params), initial)
    second, metrics_2 = step(first, batch)
    assert (int(second.step), int(optim.micro_batch_index(second.opt_state))) == (1, 0)
    assert not np.array_equal(second.params["fc8"]["kernel"], initial["fc8"]["kernel"])
    # The same batch and parameters, but each micro-batch draws its own dropout masks.
    assert float(metrics_1["loss"]) != float(metrics_2["loss"])


def test_an_epoch_of_very_few_steps_is_warned_about_in_one_line(caplog):
    # The fine-tuning recipe on 72 images in batches of 64: one step per epoch, so the
    # plateau rule (patience 3, 3 cuts) can end the 20-epoch run after 13 steps.
    config = _config()
    config.train.batch_size, config.train.num_epochs = 64, 20
    config.train.plateau_patience, config.train.plateau_max_reductions = 3, 3
    few = loop.StepCounts(train_images=72, accum_steps=1, micro_batch=64, steps_per_epoch=1,
                          total_steps=20)
    with caplog.at_level("WARNING"):
        progress.warn_if_few_steps(few, config)
        progress.warn_if_few_steps(dataclasses.replace(few, train_images=1437,
                                                       steps_per_epoch=22, total_steps=440),
                                   config)
    (record,) = caplog.records
    assert "Only 1 optimiser step(s) between validations (72 training images, batch 64" in (
        record.getMessage())
    assert "stop the run after 13 steps of the 20 asked for" in record.getMessage()
    assert "\n" not in record.getMessage()


def _grain_iterator():
    dataset = grain.MapDataset.range(100).shuffle(seed=0).to_iter_dataset()
    return iter(dataset)


def test_the_run_state_round_trips_through_a_checkpoint(tmp_path):
    config = _config()
    mesh = parallel.create_mesh()
    _, state, step = _setup(config, mesh)
    state, _ = step(state, parallel.shard_batch(_batch(), mesh))
    assert int(state.step) == 1  # one optimiser step
    plateau, _ = optim.plateau_update(optim.plateau_init(config.train), 0.5, config.train)
    iterator = _grain_iterator()
    consumed = [next(iterator) for _ in range(5)]
    run = run_state.RunState(
        train=state, step=1, plateau=plateau, data_position=json.dumps(
            iterator.get_state()).encode(), last_validation=run_state.Validation(
            1, {"val/top1_error": 0.5, "val/top5_error": 0.25}))
    manager = checkpoint.create_manager(str(tmp_path))
    run_state.save(manager, run, config, epoch=0)
    manager.wait_until_finished()
    expected_next = [next(iterator) for _ in range(3)]

    _, fresh, _ = _setup(config, mesh)
    like = run_state.RunState(train=fresh, step=0, plateau=optim.plateau_init(config.train),
                              data_position=b"")
    restored = run_state.read(manager, 1, like, config, str(tmp_path))
    for a, b in zip(jax.tree.leaves(restored.train), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(restored.train.opt_state) == jax.tree.structure(state.opt_state)
    assert (restored.step, restored.plateau, restored.last_validation) == (
        1, plateau, run.last_validation)
    assert not restored.validation_pending
    fresh_iterator = _grain_iterator()
    fresh_iterator.set_state(json.loads(restored.data_position))
    assert [next(fresh_iterator) for _ in range(3)] == expected_next
    assert consumed and run_checkpoint.read_meta(manager, 1)["validation"]["val/top1_error"] == 0.5
    assert restored.train.batch_stats == {}  # a net without batch norm saves none

    variables, loaded_config, _ = run_checkpoint.load_checkpoint(str(tmp_path))
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    assert loaded_config.model.width_divisor == 16
    manager.close()


def test_retention_keeps_the_newest_and_the_best(tmp_path):
    manager = checkpoint.create_manager(str(tmp_path), max_to_keep=2, keep_best=1)
    params = {"w": np.zeros(3, np.float32)}
    errors = {2: 0.5, 4: 0.2, 6: 0.4, 8: 0.45}
    for step in range(1, 9):
        metrics = {"val/top1_error": errors[step]} if step in errors else {}
        checkpoint.save(manager, step, params=params,
                        meta={"config": {}, run_checkpoint.VALIDATION: metrics}, metrics=metrics)
        manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [4, 7, 8]
    assert run_checkpoint.best_step(manager) == 4
    assert run_checkpoint.resolve_step(manager, "latest") == 8
    manager.close()


def test_best_is_a_validated_step_whose_single_crop_evaluation_reproduces_its_validation(
        tmp_path):
    """Three one-step epochs validated every second epoch, a checkpoint every step: steps 1
    and 3 are saved between validations and carry no metrics, so "best" (the default of
    --mode=eval) is step 2, and evaluating it single-crop gives its validation's error."""
    from vgg_jax.data import testing
    from vgg_jax.evaluation import run as evaluation

    testing.write_folder(str(tmp_path / "data"), {"train": 8, "val": 3}, size=(40, 40))
    config = _config()
    config.data.source, config.data.data_dir = "folder", str(tmp_path / "data")
    config.data.num_workers = 0
    config.model.num_classes = 2
    config.train.batch_size, config.train.num_epochs = 16, 3
    config.train.eval_every_epochs, config.train.checkpoint_every_steps = 2, 1
    config.checkpoint.max_to_keep, config.eval.batch_size = 3, 4
    config.progress_bar, config.wandb.mode = False, "disabled"
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    (validation,) = [r for r in writers.read_metrics(os.path.join(workdir, "metrics.jsonl"))
                     if "val/top1_error" in r]
    assert validation["step"] == 2
    manager = checkpoint.create_manager(workdir)
    assert manager.all_steps() == [1, 2, 3]
    assert [run_checkpoint.VALIDATION in run_checkpoint.read_meta(manager, step)
            for step in (1, 2, 3)] == [False, True, False]
    assert run_checkpoint.resolve_step(manager, "best") == run_checkpoint.resolve_step(manager, None) == 2
    manager.close()
    config.eval.protocol = "single_crop"
    (row,) = evaluation.run_evaluation(config, workdir)
    evaluated = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert evaluated["steps"] == [2]
    assert row.images == 6
    assert row.top1_error == pytest.approx(100 * validation["val/top1_error"], abs=1e-9)


def test_an_incomplete_step_directory_is_ignored_on_resume(tmp_path):
    manager = checkpoint.create_manager(str(tmp_path))
    checkpoint.save(manager, 3, params={"w": np.zeros(2, np.float32)},
                    meta={"config": {}, "metrics": {}})
    manager.wait_until_finished()
    manager.close()
    # A step-named directory without orbax's completion marker, as a cut-short copy leaves.
    os.makedirs(tmp_path / "checkpoints" / "7" / "params")
    reopened = checkpoint.create_manager(str(tmp_path))
    assert run_checkpoint.complete_steps(reopened)[-1] == 3
    reopened.close()


def test_training_loop_on_a_tfds_data_set(tmp_path):
    """configs/small_datasets.py:cifar10 end to end through TFDS's data_source (mocked),
    with batch norm: a run resumed from its epoch-1 checkpoint ends bit-identical to the
    uninterrupted run, and validation normalises with the checkpointed running averages."""
    import tensorflow_datasets as tfds

    from configs import small_datasets
    from vgg_jax.data import testing

    def as_data_source(builder, split, decoders=None, **kwargs):
        del builder, decoders, kwargs
        rng = np.random.default_rng(len(split))  # the same images in every run
        return [{"image": testing.encode(testing.smooth_image(rng, 32, 32), "PNG"),
                 "label": i % NUM_CLASSES, "id": f"{split}_{i}"}
                for i in range(40 if split == "train" else 12)]

    config = small_datasets.get_config("cifar10")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.num_workers = 0  # the mock lives in this process only
    config.model.width_divisor, config.model.fc_features = 16, 32
    config.model.batch_norm = True
    config.train.num_epochs, config.train.batch_size, config.eval.batch_size = 2, 8, 8
    config.train.log_every_steps = 2
    config.progress_bar = False
    config.wandb.mode = "disabled"
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        metrics = loop.train_and_evaluate(config, str(tmp_path / "run"))
        # As if killed during epoch 2: the epoch-1 checkpoint (step 5) is the newest.
        shutil.copytree(tmp_path / "run", tmp_path / "resumed")
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "10")
        resumed_metrics = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
        variables, loaded_config, _ = run_checkpoint.load_checkpoint(str(tmp_path / "run"), "latest")
        validate = loop.validation_fn(models.create_model_from_config(loaded_config), config,
                                       parallel.create_mesh())
        revalidated = validate(variables)
        initial_stats = {name: {"mean": np.zeros_like(s["mean"]), "var": np.ones_like(s["var"])}
                         for name, s in variables["batch_stats"].items()}
        fresh_stats = validate(dict(variables, batch_stats=initial_stats))
    assert metrics["val/count"] == 12
    assert np.isfinite(metrics["val/loss"])
    assert loaded_config.data.name == "cifar10" and loaded_config.model.batch_norm
    resumed, _, _ = run_checkpoint.load_checkpoint(str(tmp_path / "resumed"), 10)
    assert set(variables) == {"params", "batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, resumed, variables)
    assert resumed_metrics == metrics
    assert revalidated["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert abs(fresh_stats["val/loss"] - metrics["val/loss"]) > 1e-3


def test_bfloat16_step_convolves_in_bfloat16_and_donates_the_state():
    # The GPU speed levers, checked on the program XLA receives: every convolution of the
    # forward and backward pass (FC layers included, they are convolutions here) takes
    # bf16 operands, images cross to the device as uint8, and every buffer of the train
    # state is donated, i.e. aliased to an output and updated in place.
    config = _config()
    config.model.compute_dtype = "bfloat16"
    mesh = parallel.create_mesh()
    _, state, step = _setup(config, mesh)
    lowered = step.lower(state, parallel.shard_batch(_batch(), mesh))
    text = lowered.as_text()

    convolutions = re.findall(r"stablehlo\.convolution.*: \((.*)\) -> (.*)", text)
    num_layers = len(state.params)
    # Forward, input gradient (not for the first layer) and kernel gradient of each layer.
    assert len(convolutions) >= 3 * num_layers - 1
    for operands, result in convolutions:
        assert operands.count("xbf16>") == 2 and "xbf16>" in result, (operands, result)
    main_signature = next(line for line in text.splitlines() if "func.func public @main" in line)
    arguments = [(re.match(r"\d+: tensor<([^>]*)>", chunk).group(1), chunk)
                 for chunk in main_signature.split("%arg")[1:]]
    # One device: aliased at lowering; several: marked as donor, aliased by XLA.
    donated = [shape for shape, attributes in arguments
               if "tf.aliasing_output" in attributes or "jax.buffer_donor = true" in attributes]
    assert len(donated) == len(jax.tree.leaves(state))
    assert all(shape.endswith("xf32") or "x" not in shape or shape.endswith("xui32")
               for shape in donated), donated  # float32 master weights and momentum
    images = [shape for shape, _ in arguments if shape.startswith("8x32x32x3x")]
    assert images == ["8x32x32x3xui8"]
    # XLA kept the donation: the whole state (replicated, so whole on each device) aliases.
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    assert lowered.compile().memory_analysis().alias_size_in_bytes >= state_bytes


def test_profiler_traces_exactly_the_chosen_steps(tmp_path):
    config = _config()
    mesh = parallel.create_mesh()
    _, state, step_fn = _setup(config, mesh)
    batch = parallel.shard_batch(_batch(), mesh)
    profiler = profiling.StepProfiler(str(tmp_path), first_step=2, num_steps=2)
    for step in range(1, 6):
        profiler.before_step(step)
        state, metrics = step_fn(state, batch)
        profiler.after_step(step, (state, metrics))
    profiler.close()
    (trace,) = glob.glob(os.path.join(tmp_path, "profile", "**", "*.trace.json.gz"),
                         recursive=True)
    events = json.load(gzip.open(trace))["traceEvents"]
    calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("name") == "PjitFunction(train_step)")
    # Each dispatch shows as nested events of that name: count the outermost ones.
    outermost, end = 0, -1.0
    for start, stop in calls:
        if start >= end:
            outermost, end = outermost + 1, stop
    assert outermost == 2, calls
    # Off by default: nothing is written.
    idle = profiling.StepProfiler(str(tmp_path / "off"), first_step=-1, num_steps=5)
    idle.before_step(1)
    idle.after_step(1, metrics)
    assert not os.path.exists(tmp_path / "off")


def _stop_once_handled(signum):
    """Sends `signum` to this process from a thread once a run has installed its handler,
    so the run stops after its first step; never while the handler is not installed."""
    original = signal.getsignal(signum)

    def send():
        deadline = time.monotonic() + _HANDLER_WAIT_S
        while signal.getsignal(signum) is original and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if signal.getsignal(signum) is not original:
            os.kill(os.getpid(), signum)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


def test_accumulation_counts_optimiser_steps_trains_as_the_whole_batch_and_resumes(tmp_path):
    """Batch 16 as 4 micro-batches of 4 trains the same parameters as batch 16 at once over
    3 one-step epochs (dropout off; max-pool ties part fp32 trajectories after a few more),
    logs at optimiser steps; a run stopped by SIGTERM at its first epoch end saves without
    validating, and resumed it validates that epoch first and ends bit-identical to the
    uninterrupted one, with the same validations. A resume whose set-up fails raises its
    own error and leaves no thread of the run behind."""
    from vgg_jax.data import testing

    testing.write_folder(str(tmp_path / "data"), {"train": 8, "val": 2}, size=(40, 40))

    def config_for(accum):
        config = _config()
        config.data.source, config.data.data_dir = "folder", str(tmp_path / "data")
        config.data.num_workers = 0
        config.model.num_classes, config.model.dropout_rate = 2, 0.0
        config.train.batch_size, config.train.grad_accum_steps = 16, accum
        config.train.num_epochs, config.eval.batch_size = 3, 4
        config.train.log_every_steps = 1
        config.progress_bar, config.wandb.mode = False, "disabled"
        return config

    def run(accum, name):
        loop.train_and_evaluate(config_for(accum), str(tmp_path / name))
        variables, _, _ = run_checkpoint.load_checkpoint(str(tmp_path / name), "latest")
        return variables

    def records(name, metric):
        path = str(tmp_path / name / "metrics.jsonl")
        return [r for r in writers.read_metrics(path) if metric in r]

    whole = run(1, "whole")
    accumulated = run(4, "accumulated")
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    steps = [(r["step"], r["epoch"]) for r in records("accumulated", "train/loss")]
    assert steps == [(1, 1.0), (2, 2.0), (3, 3.0)]

    sender = _stop_once_handled(signal.SIGTERM)
    loop.train_and_evaluate(config_for(4), str(tmp_path / "resumed"))
    sender.join()
    manager = checkpoint.create_manager(str(tmp_path / "resumed"))
    assert manager.all_steps() == [1]
    assert run_checkpoint.read_meta(manager, 1)[run_state.RUN]["validation_pending"]
    manager.close()
    assert [r["step"] for r in records("resumed", "train/loss")] == [1]
    assert records("resumed", "val/loss") == []  # saved, not validated

    # The restore moved the data stream (its prefetch thread and grain's reader run), then
    # the writers cannot start: their error propagates, and everything is released.
    metrics_file = tmp_path / "resumed" / "metrics.jsonl"
    metrics_file.rename(tmp_path / "metrics.jsonl")
    metrics_file.mkdir()
    before = set(threading.enumerate())
    with pytest.raises(IsADirectoryError, match="metrics.jsonl"):
        loop.train_and_evaluate(config_for(4), str(tmp_path / "resumed"))
    left = [thread for thread in set(threading.enumerate()) - before
            if thread.join(_THREAD_EXIT_S) or thread.is_alive()]
    assert not left, left
    metrics_file.rmdir()
    (tmp_path / "metrics.jsonl").rename(metrics_file)

    hook = sys.unraisablehook
    jax.tree.map(np.testing.assert_array_equal, run(4, "resumed"), accumulated)
    assert records("resumed", "val/loss") == records("accumulated", "val/loss")
    assert sys.unraisablehook is hook  # the resume's filter is gone with its restores


def test_a_batch_larger_than_the_training_split_fails_before_any_work(tmp_path):
    config = quickstart.get_config()
    config.data.cache_dir = str(tmp_path)
    config.train.batch_size = 4096
    with pytest.raises(ConfigError, match=r"config\.train\.batch_size=4096 is larger than "
                       r"the training split \(\d+ images in 'train'\), so an epoch would hold "
                       r"no step; use a batch of at most \d+\."):
        loop.StepCounts.from_config(config)


def test_checkpoint_saves_leave_the_preemption_sync_point_to_the_loop(tmp_path, monkeypatch):
    # jax's sync manager remembers the latest step it was asked about; orbax asking it
    # again about a saved step from its finalize thread, steps behind the loop, could set
    # the common stop step behind the loop and lose a preemption.
    from jax.experimental import multihost_utils

    asked = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                        lambda step: asked.append(step) or False)
    manager = checkpoint.create_manager(str(tmp_path))
    checkpoint.save(manager, 3, params={"w": np.zeros(2, np.float32)},
                    meta={"config": {}, "metrics": {}})
    manager.wait_until_finished()
    manager.close()
    assert asked == []
