"""The paper's test protocols (section 3.2), data-parallel, every image counted exactly once.

Protocols, each at one or several test scales Q (the image's shorter side after isotropic
rescaling):

  single_crop       the centre image_size x image_size crop.
  dense             the net run fully-convolutionally over the whole rescaled image (the
                    model's head already is convolutional); its class score map is averaged
                    spatially, turned into a softmax, and averaged with that of the
                    horizontally flipped image.
  multi_crop        a regular grid x grid of image_size crops (5 x 5 in the paper) and their
                    flips: the softmax averaged over the 2 * grid^2 crops.
  dense+multi_crop  the average of the dense and the multi-crop softmax.

Several scales average the softmax over scales; several nets (an ensemble) average the
softmax over nets. Every level averages with equal weights, as the paper does.

Dense evaluation sees whole images of many sizes. To keep the number of XLA compilations
bounded, the rescaled image is centre-cropped to a multiple of `config.eval.dense_size_step`
pixels (32, the net's stride, by default: the pools mostly drop those border pixels anyway)
and images of equal shape are batched together (one bucket per shape). Each bucket compiles
once per net, and its batch is padded to a fixed size, so the last partial batch does not
compile again. The number of compilations is reported with the results.

Exactness on any number of devices and processes: image i belongs to process
i % process_count for every pass, each process pads its share of every bucket to the same
number of batches (padding rows carry mask 0), and the per-image results are only ever
counted on the owning process; counts are summed over processes at the end.

This module runs the nets over the plan and keeps their device functions; the views and the
batch plan are in vgg_jax.eval_plan, the counts, result rows and tables in vgg_jax.eval_results.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from vgg_jax import paper_results, parallel
from vgg_jax.config_values import string_list
from vgg_jax.eval_plan import (
    DENSE,
    MULTI_CROP,
    SINGLE_CROP,
    ViewMaker,
    gather_dense_keys,
    plan_buckets,
    uniform_keys,
    view_batches,
)
from vgg_jax.eval_results import (
    Tally,
    final_probabilities,
    format_table,
    result_rows,
    write_results,
)
from vgg_jax.models import canonical_version, create_model_from_config
from vgg_jax.preprocess import normalize_images

logger = logging.getLogger(__name__)

# The protocols, made of the components named in vgg_jax.eval_plan (whose views it makes).
DENSE_MULTI_CROP = "dense+multi_crop"
PROTOCOLS = (SINGLE_CROP, DENSE, MULTI_CROP, DENSE_MULTI_CROP)
# Data fields that, when they differ from the checkpoint's run, mean another data set.
_DATA_IDENTITY_FIELDS = ("source", "name", "data_dir", "eval_split")


def protocol_components(protocol: str) -> tuple[str, ...]:
    """The passes a protocol needs: ("dense", "multi_crop") for the combined protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"Unknown config.eval.protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}."
        )
    return (DENSE, MULTI_CROP) if protocol == DENSE_MULTI_CROP else (protocol,)


# --------------------------------------------------------------------------------------
# Nets and their device functions
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalNet:
    """One net to evaluate: its module, variables and the preprocessing it was trained with.

    Attributes:
      name: shown in the results table.
      model: the flax module (its image_size is the crop size).
      variables: {"params"[, "batch_stats"]} (host or device arrays).
      mean_rgb, std_rgb: the net's input normalisation (0-255 scale).
      train_scale: (S_min, S_max) the net was trained with.
      step: the checkpoint step the parameters come from (None: not from a checkpoint).
      version: the paper's configuration ("A" ... "E", "A_LRN"), for comparisons with the
        paper's tables ("" when unknown).
    """

    name: str
    model: Any
    variables: Any
    mean_rgb: Sequence[float]
    std_rgb: Sequence[float] = (1.0, 1.0, 1.0)
    train_scale: tuple[int, int] = (256, 256)
    step: int | None = None
    version: str = ""

    @property
    def train_scale_label(self) -> str:
        lo, hi = self.train_scale
        return str(lo) if lo == hi else f"[{lo};{hi}]"


def class_probabilities(
    model, mean_rgb, std_rgb, flip: bool, variables, views: jax.Array
) -> jax.Array:
    """Softmax averaged over an image's views (and their flips): the core of every protocol.

    Args:
      model: the VGG module.
      mean_rgb, std_rgb: input normalisation.
      flip: also run every view flipped horizontally and average the two softmax outputs.
      variables: the net's {"params"[, "batch_stats"]} (batch norm uses the running
        averages).
      views: uint8 [B, V, H, W, 3]; V crops of one image (V = 1 for single crop and dense),
        each at least image_size on both sides.

    Returns:
      float32 [B, classes]. A view larger than image_size gives a class score map, which is
      averaged spatially before the softmax (dense evaluation, paper 3.2).
    """
    b, v = views.shape[:2]
    x = views.reshape((b * v,) + views.shape[2:])
    x = normalize_images(x, mean_rgb, std_rgb, None, model.dtype)
    if flip:
        # Stacked next to each original so that a device's rows stay on that device.
        x = jnp.stack([x, jnp.flip(x, axis=2)], axis=1).reshape((-1,) + x.shape[1:])
    scores = model.apply(variables, x, train=False, dense=True)
    scores = scores.astype(jnp.float32).mean(axis=(1, 2))
    probs = jax.nn.softmax(scores, axis=-1)
    return probs.reshape(b, -1, probs.shape[-1]).mean(axis=1)


def make_probability_fn(net: EvalNet, flip: bool, mesh) -> Callable:
    """`class_probabilities` for one net, jit-compiled with the batch sharded over 'data'."""
    fn = functools.partial(
        class_probabilities, net.model, tuple(net.mean_rgb), tuple(net.std_rgb), flip
    )
    return jax.jit(fn, out_shardings=parallel.batch_sharded(mesh))


# --------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------


def evaluate_nets(
    nets: Sequence[EvalNet],
    source: Any,
    *,
    protocol: str = SINGLE_CROP,
    scales: Sequence[int],
    batch_size: int = 128,
    multi_crop_grid: int = 5,
    flip: bool = True,
    dense_size_step: int = 32,
    num_threads: int = 4,
    progress_bar: bool = True,
    mesh=None,
    return_probabilities: bool = False,
) -> dict[str, Any]:
    """Evaluates one net or an ensemble on a whole split with a paper protocol.

    Args:
      nets: the nets; with several, their softmax outputs are averaged (an ensemble).
        They must share image_size and the number of classes.
      source: random access to the split: records {"image": encoded bytes, "label": int}
        (vgg_jax.data.sources, or `eval_plan.ArrayImages` for arrays).
      protocol: one of PROTOCOLS.
      scales: test scales Q (each at least image_size); softmax averaged over them.
      batch_size: per global batch, the number of image_size x image_size net inputs
        (crops, flips and dense area count); the images per batch follow from it.
      multi_crop_grid: crops per side of the multi-crop grid.
      flip: average with horizontal flips in dense and multi-crop evaluation (paper: yes).
      dense_size_step: dense views are cropped to multiples of this (bounds compilations).
      num_threads: host threads decoding images (0: in this thread).
      progress_bar: show tqdm progress (process 0 only).
      mesh: the data mesh (default: every device).
      return_probabilities: also return this process's final per-image probabilities.

    Returns:
      {"rows": [result row dicts], "compilations": int, "buckets": {component@Q: count},
       "undecodable": int}; with return_probabilities also "probabilities" [local N, C]
       (the softmax averaged over nets, protocol components and scales: the last row's)
       and "indices" (their global image indices, this process's images only).

    Host memory: with several scales, components or nets, one float32 [images, classes]
    array per net and component is kept (200 MB per array for the 50K ImageNet images on
    one process; divided by the process count on several).
    """
    if not nets:
        raise ValueError("No net to evaluate.")
    image_size = nets[0].model.image_size
    num_classes = nets[0].model.num_classes
    for net in nets[1:]:
        if net.model.image_size != image_size or net.model.num_classes != num_classes:
            raise ValueError(
                f"Ensemble nets must share image_size and num_classes: {nets[0].name} has "
                f"{image_size}/{num_classes}, {net.name} has {net.model.image_size}/"
                f"{net.model.num_classes}."
            )
    components = protocol_components(protocol)
    scales = tuple(int(q) for q in scales)
    if not scales:
        raise ValueError("No test scale given.")
    if min(scales) < image_size:
        raise ValueError(
            f"Test scale Q={min(scales)} is smaller than the crop size {image_size}; "
            "every Q in config.eval.scales must be at least config.data.image_size."
        )
    mesh = mesh if mesh is not None else parallel.create_mesh()
    device_count, process_count = mesh.devices.size, jax.process_count()
    process_index = jax.process_index()
    if device_count % process_count:
        raise ValueError(f"{device_count} devices do not split over {process_count} processes.")

    # Fixed ownership: image i is evaluated (and counted) by process i % process_count.
    global_indices = np.arange(process_index, len(source), process_count)
    num_local = len(global_indices)
    labels = np.full(num_local, -1, np.int64)
    decoded = np.zeros(num_local, bool)

    variables = [parallel.replicate(net.variables, mesh) for net in nets]
    # Nets with the same module and preprocessing (an ensemble of snapshots of one net)
    # share one jitted function, so they also share its compilations.
    jitted: dict[tuple, Callable] = {}
    fns, fn_keys = {}, {}
    for i, net in enumerate(nets):
        for c in components:
            # Multi-crop flips are made on the host with the crops; dense flips here.
            use_flip = flip and c == DENSE
            key = (net.model, tuple(net.mean_rgb), tuple(net.std_rgb), use_flip)
            if key not in jitted:
                jitted[key] = make_probability_fn(net, use_flip, mesh)
            fns[(i, c)], fn_keys[(i, c)] = jitted[key], key
    # jit compiles each function once per input shape: (function, shape) pairs counted.
    compiled: set[tuple] = set()
    # Softmax sums over scales per (net, component); only kept when rows combine them.
    combine = len(scales) > 1 or len(components) > 1 or len(nets) > 1 or return_probabilities
    sums = {key: np.zeros((num_local, num_classes), np.float32) for key in fns} if combine else {}
    tallies: dict[tuple[int, str, int], Tally] = {}
    bucket_counts: dict[str, int] = {}
    seen_shape_keys: dict[int, np.ndarray] = {}

    for component in components:
        flips = 2 if flip and component != SINGLE_CROP else 1
        for q in scales:
            if component == DENSE:
                if q not in seen_shape_keys:
                    seen_shape_keys[q] = gather_dense_keys(
                        source, global_indices, q, image_size, dense_size_step, num_threads,
                        process_count)
                keys = seen_shape_keys[q]
                costs = {
                    (h, w): flips * math.ceil(h * w / image_size**2)
                    for h, w in {tuple(int(v) for v in k) for k in keys.reshape(-1, 2) if k[0] >= 0}
                }
            else:
                views = multi_crop_grid**2 if component == MULTI_CROP else 1
                keys = uniform_keys(len(source), (image_size, image_size), process_count)
                costs = {(image_size, image_size): views * flips}
            buckets = plan_buckets(keys, costs, batch_size, device_count, process_count)
            bucket_counts[f"{component}@{q}"] = len(buckets)
            for i in range(len(nets)):
                tallies[(i, component, q)] = Tally()
            total = sum(b.num_batches for b in buckets)
            bar = _progress(total, f"{component} Q={q}", progress_bar and process_index == 0)
            visits = np.zeros(num_local, np.int64)
            for bucket in buckets:
                maker = ViewMaker(source, global_indices, component, q, image_size,
                                   multi_crop_grid, flip, bucket.shape)
                pending = None
                for batch in view_batches(maker, bucket, num_threads):
                    device_batch = parallel.shard_batch({"views": batch["views"]}, mesh)
                    outputs = [fns[(i, component)](variables[i], device_batch["views"])
                               for i in range(len(nets))]
                    compiled.update((fn_keys[(i, component)], device_batch["views"].shape)
                                    for i in range(len(nets)))
                    # Fetch the previous batch while this one computes.
                    if pending is not None:
                        _consume(*pending, mesh, component, q, labels, decoded, visits,
                                 tallies, sums)
                    pending = (batch, outputs)
                    bar.update(1)
                if pending is not None:
                    _consume(*pending, mesh, component, q, labels, decoded, visits,
                             tallies, sums)
            bar.close()
            if not np.all(visits == 1):
                raise AssertionError(
                    f"Evaluation plan bug: {int(np.sum(visits != 1))} images were not visited "
                    "exactly once.")

    valid = decoded
    rows, local_counts = result_rows(nets, components, scales, tallies, sums, labels, valid,
                                      protocol)
    global_counts = _sum_over_processes(np.asarray(local_counts, np.int64))
    for row, (t1, t5, n) in zip(rows, global_counts):
        row["top1_error"] = 100.0 * (1.0 - t1 / n) if n else float("nan")
        row["top5_error"] = 100.0 * (1.0 - t5 / n) if n else float("nan")
        row["images"] = int(n)
    undecodable = int(_sum_over_processes(np.array([num_local - valid.sum()], np.int64))[0])
    compilations = len(compiled)
    result = {"rows": rows, "compilations": compilations, "buckets": bucket_counts,
              "undecodable": undecodable}
    if return_probabilities:
        result["probabilities"] = final_probabilities(nets, components, scales, sums)
        result["indices"] = global_indices
    return result


def _consume(batch, outputs, mesh, component, q, labels, decoded, visits, tallies, sums):
    rows, mask = batch["row"], batch["mask"]
    real = rows >= 0
    visits[rows[real]] += 1
    labels[rows[real]] = batch["label"][real]
    decoded[rows[mask]] = True
    for i, out in enumerate(outputs):
        probs = np.asarray(
            multihost_utils.global_array_to_host_local_array(out, mesh, PartitionSpec("data")))
        tallies[(i, component, q)].add(probs[mask], batch["label"][mask])
        if sums:
            sums[(i, component)][rows[mask]] += probs[mask]


def _sum_over_processes(local: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False)


# --------------------------------------------------------------------------------------
# Entry point (main.py --mode=eval)
# --------------------------------------------------------------------------------------


def load_net(path: str, step: int | str | None = None) -> tuple[EvalNet, ml_collections.ConfigDict]:
    """An EvalNet from a workdir or weight file (see vgg_jax.checkpoint.load_variables)."""
    from vgg_jax import checkpoint

    variables, run_config, chosen_step = checkpoint.load_checkpoint(path, step)
    model = create_model_from_config(run_config)
    d = run_config.data
    name = f"{run_config.model.version} ({os.path.basename(os.path.normpath(path))})"
    net = EvalNet(
        name=name, model=model, variables=variables, mean_rgb=tuple(d.mean_rgb),
        std_rgb=tuple(d.get("std_rgb", (1.0, 1.0, 1.0))),
        train_scale=(int(d.train_scale_min), int(d.train_scale_max)), step=chosen_step,
        version=canonical_version(run_config.model.version),
    )
    return net, run_config


def run_evaluation(
    config: ml_collections.ConfigDict, workdir: str, step: int | str | None = None
) -> list[dict[str, Any]]:
    """Evaluates the workdir's checkpoint (and config.eval.ensemble) on the eval split.

    The nets, their preprocessing and their training scale S come from the checkpoints'
    own configs; the protocol, scales, batch size and data set come from `config`.

    Args:
      config: the run config (config.eval and config.data are read).
      workdir: the run's directory (or a weight file's); results are written here.
      step: checkpoint step (number, "best", "latest"; None: best if any, else latest).

    Returns:
      The result rows (also printed, and written as eval_results.json / .md).
    """
    from vgg_jax.data import sources

    ev = config.eval
    net, run_config = load_net(workdir, step)
    _warn_about_other_data(run_config, config)
    ensemble = string_list(ev.ensemble)
    nets = [net]
    for path in ensemble:
        try:
            nets.append(load_net(path)[0])
        except ValueError as error:
            raise ValueError(f"config.eval.ensemble names {path!r}: {error}") from None
    train_scales = {n.train_scale for n in nets}
    if not ev.scales and len(train_scales) > 1:
        # The paper's test scales follow from S, and every net here sees the same views.
        raise ValueError(
            f"config.eval.ensemble mixes nets trained at different scales S "
            f"{sorted(train_scales)}, so the paper's test scales are ambiguous; set "
            "config.eval.scales explicitly (e.g. --config.eval.scales=256,384,512).")
    scales = paper_results.test_scales(ev.scales, *net.train_scale,
                                       multi_scale=bool(ev.multi_scale))
    source = sources.make_source(config.data, str(config.data.eval_split))
    data_classes = sources.num_classes(config.data)
    for n in nets:
        if n.model.num_classes != data_classes:
            raise ValueError(
                f"Net {n.name} has {n.model.num_classes} classes but the data set "
                f"({config.data.source}: {config.data.get('name', '')}) has {data_classes}; "
                "evaluate it on the data it was trained for.")
    result = evaluate_nets(
        nets, source, protocol=str(ev.protocol), scales=scales,
        batch_size=int(ev.batch_size),
        multi_crop_grid=int(ev.multi_crop_grid), flip=bool(ev.flip),
        dense_size_step=int(ev.dense_size_step),
        # Decoding threads: the workers' budget of training (PIL releases the GIL).
        num_threads=int(config.data.num_workers),
        progress_bar=bool(config.progress_bar),
    )
    table = format_table(result["rows"])
    if jax.process_index() == 0:
        print(table)
        print(f"{result['compilations']} compilations; buckets per pass {result['buckets']}; "
              f"{result['undecodable']} undecodable images.")
        data_name = config.data.name if config.data.source == "tfds" else config.data.data_dir
        extra = {"split": f"{config.data.source}:{data_name or ''}:{config.data.eval_split}",
                 "checkpoints": [workdir, *ensemble], "steps": [n.step for n in nets],
                 "protocol": str(ev.protocol)}
        write_results(workdir, result, extra)
    return result["rows"]


def _warn_about_other_data(run_config: ml_collections.ConfigDict,
                           config: ml_collections.ConfigDict) -> None:
    # The net comes from the checkpoint, the data from the command line: say so when the
    # two name different data, since that is more often a forgotten flag than a choice.
    differences = [
        f"data.{field}={config.data.get(field)!r} (training: {run_config.data.get(field)!r})"
        for field in _DATA_IDENTITY_FIELDS
        if field in run_config.data and config.data.get(field) != run_config.data.get(field)]
    if differences:
        logger.warning("Evaluating on other data than the net was trained on: %s. Pass the "
                       "training run's --config (and data flags) to evaluate on its data.",
                       "; ".join(differences))
