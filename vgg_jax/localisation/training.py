"""What classification's training loop takes from localisation (the paper's Appendix A).

The loop, its checkpoints, resume, plateau rule and writers are classification's
(vgg_jax.training); a box net changes five things, selected by config.model.box_regression
(vgg_jax.training.task): the training records (images joined with their boxes), the
per-crop transform (the paper's augmentation plus each crop's box target), the loss sums of
the step (Euclidean, `regression.box_sums`), the training metrics logged, and the
validation (protocol 1 on the validation split, whose localisation error drives the plateau
rule and ranks the checkpoints).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgg_jax import metric_names as names
from vgg_jax.config_values import ConfigError, require
from vgg_jax.data import sources, transforms
from vgg_jax.evaluation.evaluator import EvalNet
from vgg_jax.localisation import annotations, canvas, protocols, regression
from vgg_jax.localisation.evaluator import BoxNet, LocalisationEvaluator
from vgg_jax.localisation.source import LocalisationSource, class_synsets, image_index, join
from vgg_jax.models import BOX_COORDINATES, VGG, is_box_regressor

# The entries a localisation training example adds to classification's.
BOX_KEY, BOX_WEIGHT_KEY = "box", "box_weight"
_SUM_KEYS = ("loss", "loc_errors", "count", "dropped")


def check_config(config: ml_collections.ConfigDict) -> None:
    """The rules of config.localisation for a box net (config.model.box_regression set).

    Args:
      config: the run config.

    Raises:
      ConfigError: one sentence naming the first bad field and the fix.
    """
    require("localisation" in config,
            "config.model.box_regression is set but the config has no localisation section; "
            "start from configs/localisation.py (e.g. configs/localisation.py:digits).")
    loc = config.localisation
    require(0.0 < loc.min_visible <= 1.0,
            f"config.localisation.min_visible={loc.min_visible} must be in (0, 1] (the share "
            "of its box a training crop must hold; OverFeat: 0.5).")
    require(0.0 < loc.merge_min_iou <= 1.0,
            f"config.localisation.merge_min_iou={loc.merge_min_iou} must be in (0, 1].")
    for protocol in loc.protocols:
        require(protocol in protocols.PROTOCOLS,
                f"config.localisation.protocols holds {protocol!r}; use "
                f"{', '.join(protocols.PROTOCOLS)} (the paper's protocols 1 and 2).")
    require(config.train.plateau_monitor in (names.VAL_LOC_ERROR, names.VAL_LOSS),
            f"config.train.plateau_monitor={config.train.plateau_monitor!r} is a classification "
            f"metric; a box net's validation reports {names.VAL_LOC_ERROR} and {names.VAL_LOSS}.")


def prepare_data(config: ml_collections.ConfigDict) -> None:
    """Writes the digits canvases when the config asks for them (once; a second or so).

    Args:
      config: any run config; only one whose config.localisation.digits_canvas is set
        writes anything (into config.data.data_dir).
    """
    if "localisation" in config and config.localisation.get("digits_canvas"):
        canvas.prepare_canvas(config.data, config.localisation.canvas)


def check_data(config: ml_collections.ConfigDict) -> None:
    """Before a training run: writes the digits canvases if asked for, and finds a box
    net's annotation files.

    Args:
      config: the run config.

    Raises:
      ConfigError: canvases that cannot be written, or a missing annotation path.
    """
    try:
        prepare_data(config)
    except (OSError, ValueError) as error:
        raise ConfigError(f"Could not write the digits canvases into config.data.data_dir="
                          f"{config.data.data_dir!r}: {error}") from None
    if not is_box_regressor(config):
        return
    for split in (str(config.data.train_split), str(config.data.eval_split)):
        path = os.path.expanduser(annotations_path(config, split))
        require(os.path.exists(path),
                f"The box annotations of split {split!r}, {path!r}, do not exist; fix "
                "config.localisation.train_annotations / eval_annotations.")


def annotations_path(config: ml_collections.ConfigDict, split: str) -> str:
    """The box annotations of a split: config.localisation's, or the canvases' own CSV.

    Args:
      config: the run config.
      split: config.data.train_split or eval_split.

    Returns:
      A Kaggle CSV file or an ILSVRC XML path.

    Raises:
      ConfigError: when the field for that split is empty.
    """
    loc = config.localisation
    train = split == str(config.data.train_split)
    field = "train_annotations" if train else "eval_annotations"
    if loc.get(field):
        return str(loc[field])
    if loc.get("digits_canvas"):
        key = canvas.TRAIN_DIR if train else canvas.VAL_DIR
        return f"{config.data.data_dir}/{canvas.SOLUTION_FILES[key]}"
    raise ConfigError(
        f"config.localisation.{field} is not set; pass the split's boxes: Kaggle's "
        f"LOC_{'train' if train else 'val'}_solution.csv or ILSVRC's Annotations/CLS-LOC/"
        f"{'train' if train else 'val'} directory.")


def make_source(config: ml_collections.ConfigDict, split: str) -> LocalisationSource:
    """A split's images joined with their boxes (`source.join`), faults counted and logged.

    Args:
      config: the run config.
      split: the split name.

    Returns:
      The LocalisationSource.

    Raises:
      ValueError: for missing images or annotations, or a split without any box.
    """
    prepare_data(config)
    images = sources.make_source(config.data, split)
    keys, labels = image_index(images, config.data.get("cache_dir"))
    joined = join(images, annotations.read_annotations(annotations_path(config, split)), keys,
                  labels, class_synsets(images))
    if not len(joined):
        raise ValueError(
            f"No image of split {split!r} has a box in {annotations_path(config, split)}; "
            "check that the annotations belong to these images (joined by file name).")
    return joined


class BoxTrainAugmentation(transforms.TrainAugmentation):
    """The paper's training augmentation, plus each crop's box target and weight.

    Adds to every example BOX_KEY (float32 [4], a centre box, fractions of the crop) and
    BOX_WEIGHT_KEY (float32, 0 for a crop that loses its object: `regression.crop_target`).

    Args:
      config: the run config (config.data's augmentation, config.localisation.min_visible).
    """

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config.data)
        self.min_visible = float(config.localisation.min_visible)

    def augment_example(self, record: dict[str, Any], rng: np.random.Generator,
                        out: np.ndarray) -> dict[str, Any]:
        rgb_shift, note, placement = self.augment_placed(record["image"], record["name"], rng,
                                                         out)
        if placement is None:  # undecodable: masked out of everything
            box, weight = np.zeros(BOX_COORDINATES, np.float32), np.float32(0.0)
        else:
            box, weight = regression.crop_target(record["boxes"], placement, self.min_visible)
        return {transforms.RGB_SHIFT_KEY: rgb_shift, transforms.DECODE_ERROR_KEY: note,
                BOX_KEY: box, BOX_WEIGHT_KEY: weight}


def step_sums(config: ml_collections.ConfigDict):
    """The loss sums of the train step for a box net (the step's `sums` argument).

    Args:
      config: the run config (its head and crop size).

    Returns:
      (outputs, batch, weights) -> {"loss", "loc_errors", "count", "dropped"}: the
      Euclidean loss and wrong boxes over the crops that keep their target, and the
      decoded crops dropped for losing it.
    """
    head, window = str(config.model.box_regression), int(config.data.image_size)

    def sums(outputs: jax.Array, batch: Mapping[str, jax.Array], weights: jax.Array):
        kept = weights * batch[BOX_WEIGHT_KEY]
        result = regression.box_sums(outputs, batch["label"], batch[BOX_KEY], kept, head,
                                     window)
        result["dropped"] = jnp.sum(weights * (1.0 - batch[BOX_WEIGHT_KEY]))
        return result

    return sums


def train_metrics(host_sums: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The logged training metrics of a box net from the steps' sums since the last log.

    Args:
      host_sums: the steps' metric dicts (host values).

    Returns:
      {train/loss (mean over kept crops), train/loc_error (fraction of kept crops whose
      box has IoU < 0.5 with the target), train/dropped_crops (count)}.
    """
    totals = {key: float(np.sum([s[key] for s in host_sums])) for key in _SUM_KEYS}
    count = max(totals["count"], 1.0)
    return {names.TRAIN_LOSS: totals["loss"] / count,
            names.TRAIN_LOC_ERROR: totals["loc_errors"] / count,
            names.TRAIN_DROPPED_CROPS: totals["dropped"]}


def describe(metrics: Mapping[str, float]) -> str:
    """A validation's outcome in words (the loop's last line)."""
    error = metrics[names.VAL_LOC_ERROR]
    return (f"localisation error {100 * error:.2f}% (protocol 1: central crop, ground-truth "
            f"class), box loss {metrics[names.VAL_LOSS]:.4f}")


def validation_fn(model: VGG, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """The validation a box net's training runs after each epoch: protocol 1.

    Args:
      model: the box net.
      config: the run config.
      mesh: the data mesh.

    Returns:
      A function of the variables returning {val/loss, val/loc_error (a fraction, as
      classification's errors), val/count}.
    """
    d = config.data
    q = transforms.single_test_scale(d.train_scale_min, d.train_scale_max)
    evaluator = LocalisationEvaluator(
        make_source(config, str(d.eval_split)), model.image_size,
        batch_size=config.eval.batch_size, mesh=mesh, num_threads=max(1, int(d.num_workers)),
        min_visible=float(config.localisation.min_visible))
    head = str(config.model.box_regression)

    def validate(variables) -> dict[str, float]:
        net = EvalNet("validation", model, variables, tuple(d.mean_rgb), tuple(d.std_rgb))
        outcome = evaluator.central_crop(BoxNet(net, head), q)
        return {names.VAL_LOSS: outcome.loss / max(outcome.loss_count, 1.0),
                names.VAL_LOC_ERROR: outcome.error / 100.0, names.VAL_COUNT: outcome.images}

    return validate


def task_parts(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields of vgg_jax.training.task.Task for a box net.

    Args:
      config: the run config.

    Returns:
      {"train_source", "train_transform", "step_sums", "train_metrics", "describe"}.
    """
    return {"train_source": make_source(config, str(config.data.train_split)),
            "train_transform": BoxTrainAugmentation(config), "step_sums": step_sums(config),
            "train_metrics": train_metrics, "describe": describe}
