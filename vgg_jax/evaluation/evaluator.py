"""The evaluator: nets run over a split with a protocol, for validation and --mode=eval alike.

Training's validation is the single-crop protocol at the single test scale Q without
flips, run every few epochs by one long-lived Evaluator (its plan and compiled functions
are made once); `main.py --mode=eval` runs the configured protocol over one net or an
ensemble (vgg_jax.evaluation.run). Both take the same road: the plan (vgg_jax.evaluation.plan)
lays the images out in padded per-process batches, grain threads decode their views, the
jitted `protocols.log_probabilities` and `metrics.classification_sums` run on the mesh, and
an `results.Accumulator` counts them.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from vgg_jax.evaluation import metrics, plan
from vgg_jax.evaluation.protocols import Protocol, log_probabilities
from vgg_jax.evaluation.results import Accumulator, Evaluation
from vgg_jax.runtime import console, parallel


@dataclasses.dataclass
class EvalNet:
    """One net to evaluate: its module, variables and the preprocessing it was trained with.

    Attributes:
      name: shown in the results table.
      model: the flax module (its image_size is the crop size).
      variables: {"params"[, "batch_stats"]} (host or device arrays).
      mean_rgb, std_rgb: the net's input normalisation (0-255 scale).
      train_scale: (S_min, S_max) the net was trained with.
      step: the checkpoint step the variables come from (None: not from a checkpoint).
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


def _pass_function(model, mean_rgb, std_rgb, flip, variables, views, labels, mask):
    log_probs = log_probabilities(model, mean_rgb, std_rgb, flip, variables, views)
    sums = metrics.classification_sums(log_probs, labels, mask.astype(jax.numpy.float32))
    return jax.numpy.exp(log_probs), sums


class Evaluator:
    """Evaluates nets on one split with one protocol; every image counted exactly once.

    Args:
      source: random access to the split: records {"image": encoded bytes, "label": int}
        (vgg_jax.data.sources, or data.testing.ArrayImages).
      protocol: what to compute (components, scales, grid, flips).
      image_size: the nets' crop size.
      batch_size: per global batch, net inputs of image_size x image_size
        (config.eval.batch_size; crops, flips and dense area count, so a single-crop batch
        holds that many images).
      mesh: the data mesh (default: every device).
      num_threads: host threads decoding images (0: in this thread).
      progress_bar: show tqdm progress (process 0 only).

    Raises:
      ValueError: for a test scale below the crop size.
    """

    def __init__(self, source: Any, protocol: Protocol, image_size: int, *, batch_size: int,
                 mesh=None, num_threads: int = 4, progress_bar: bool = False):
        if min(protocol.scales) < image_size:
            raise ValueError(
                f"Test scale Q={min(protocol.scales)} is smaller than the crop size {image_size};"
                " every Q in config.eval.scales must be at least config.data.image_size.")
        self.source, self.protocol, self.image_size = source, protocol, int(image_size)
        self.batch_size, self.num_threads = int(batch_size), int(num_threads)
        self.mesh = mesh if mesh is not None else parallel.create_mesh()
        self.progress_bar = progress_bar and jax.process_index() == 0
        self.process_count = jax.process_count()
        if self.mesh.devices.size % self.process_count:
            raise ValueError(
                f"{self.mesh.devices.size} devices do not split over {self.process_count} "
                "processes.")
        self.global_indices = plan.local_indices(len(source), jax.process_index(),
                                                 self.process_count)
        # Made once per evaluator: the plan of each (component, Q) pass, the jitted function
        # of each (module, mean, std, flip), and the (function, input shape) pairs compiled.
        self._buckets: dict[tuple[str, int], list[plan.Bucket]] = {}
        self._functions: dict[tuple, Callable] = {}
        self._compiled: set[tuple[Callable, tuple]] = set()

    def buckets(self, component: str, q: int) -> list[plan.Bucket]:
        """The padded batches of one pass (planned once per evaluator)."""
        if (component, q) not in self._buckets:
            keys = plan.pass_keys(self.source, self.global_indices, self.protocol, component, q,
                                  self.image_size, self.num_threads, self.process_count)
            shapes = {tuple(int(v) for v in k) for k in keys.reshape(-1, 2) if k[0] >= 0}
            costs = {s: self.protocol.cost(component, s, self.image_size) for s in shapes}
            self._buckets[component, q] = plan.plan_buckets(
                keys, costs, self.batch_size, self.mesh.devices.size, self.process_count)
        return self._buckets[component, q]

    def function(self, net: EvalNet, component: str) -> Callable:
        """The jitted (variables, views, labels, mask) -> (probabilities, sums) of a pass.

        One function per module and preprocessing: snapshots of one net (an ensemble, or
        training's validation every epoch) share its compilations.
        """
        key = (net.model, tuple(net.mean_rgb), tuple(net.std_rgb),
               self.protocol.device_flip(component))
        if key not in self._functions:
            self._functions[key] = jax.jit(
                functools.partial(_pass_function, *key),
                out_shardings=(parallel.batch_sharded(self.mesh), parallel.replicated(self.mesh)))
        return self._functions[key]

    def run(self, nets: Sequence[EvalNet], keep_probabilities: bool = False) -> Evaluation:
        """Evaluates one net or an ensemble (softmax averaged over nets).

        Args:
          nets: the nets; they must share image_size and the number of classes.
          keep_probabilities: also return this process's final softmax outputs.

        Returns:
          The Evaluation (rows, compilations, buckets, undecodable images).

        Host memory: when rows combine passes, one float32 [images, classes] array per net
        and component is kept (200 MB per array for the 50K ImageNet images on one
        process; divided by the process count on several).
        """
        accumulator = self._accumulate(nets, keep_probabilities)
        evaluation = Evaluation(
            rows=accumulator.rows(), compilations=len(self._compiled),
            buckets=tuple((c, q, len(self.buckets(c, q))) for c in self.protocol.components
                          for q in self.protocol.scales),
            undecodable=accumulator.undecodable())
        if keep_probabilities:
            evaluation = dataclasses.replace(
                evaluation, probabilities=accumulator.final_probabilities(),
                indices=self.global_indices)
        return evaluation

    def validate(self, net: EvalNet) -> dict[str, float]:
        """Training's validation: one net, one pass; mean loss, top-1/top-5 error, count.

        Args:
          net: the net with its current variables (replicated on the mesh).

        Returns:
          {"loss", "top1_error", "top5_error" (fractions), "count"} over the valid images.
        """
        if len(self.protocol.components) * len(self.protocol.scales) != 1:
            raise ValueError("Validation is one pass: one component at one test scale.")
        return self._accumulate([net], False).pass_means()

    def _accumulate(self, nets: Sequence[EvalNet], keep_probabilities: bool) -> Accumulator:
        if not nets:
            raise ValueError("No net to evaluate.")
        first = nets[0].model
        for net in nets[1:]:
            if (net.model.image_size, net.model.num_classes) != (first.image_size,
                                                                 first.num_classes):
                raise ValueError(
                    f"Ensemble nets must share image_size and num_classes: {nets[0].name} has "
                    f"{first.image_size}/{first.num_classes}, {net.name} has "
                    f"{net.model.image_size}/{net.model.num_classes}.")
        accumulator = Accumulator(nets, self.protocol, len(self.global_indices),
                                  first.num_classes, keep_probabilities)
        variables = [parallel.replicate(net.variables, self.mesh) for net in nets]
        for c, component in enumerate(self.protocol.components):
            functions = [self.function(net, component) for net in nets]
            for s, q in enumerate(self.protocol.scales):
                accumulator.start_pass()
                sums = self._run_pass(functions, variables, component, c, q, accumulator)
                accumulator.end_pass(c, s, sums)
        return accumulator

    def _run_pass(self, functions, variables, component: str, c: int, q: int,
                  accumulator: Accumulator) -> list[list]:
        sums: list[list] = [[] for _ in functions]
        buckets = self.buckets(component, q)
        bar = _progress(sum(b.num_batches for b in buckets), f"{component} Q={q}",
                        self.progress_bar)
        for bucket in buckets:
            maker = plan.ViewMaker(self.source, self.global_indices, self.protocol, component,
                                   q, self.image_size, bucket.shape)
            pending = None
            for batch in plan.view_batches(maker, bucket, self.num_threads):
                device = parallel.shard_batch(
                    {key: batch[key] for key in ("views", "label", "mask")}, self.mesh)
                outputs = [fn(v, device["views"], device["label"], device["mask"])
                           for fn, v in zip(functions, variables)]
                self._compiled.update((fn, device["views"].shape) for fn in functions)
                for net_sums, (_, batch_sums) in zip(sums, outputs):
                    net_sums.append(batch_sums)
                # Fetch the previous batch's probabilities while this one computes.
                if pending is not None:
                    self._consume(*pending, c, accumulator)
                pending = (batch, [probs for probs, _ in outputs])
                bar.update(1)
            if pending is not None:
                self._consume(*pending, c, accumulator)
        bar.close()
        return sums

    def _consume(self, batch, probabilities, c: int, accumulator: Accumulator) -> None:
        local = []
        if accumulator.keeps_probabilities:
            local = [multihost_utils.global_array_to_host_local_array(
                p, self.mesh, PartitionSpec(parallel.DATA_AXIS)) for p in probabilities]
            local = [jax.device_get(p) for p in local]
        accumulator.add_batch(batch, c, local)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    # Off a terminal (a log file, SLURM output) a bar's frames would pile up; the results
    # printed after each protocol are the record there.
    if not enabled or not console.is_terminal(sys.stderr):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False)
