"""`main.py --mode=eval` of a box net: the paper's localisation protocols, recorded.

The box net comes from the workdir's checkpoint (and config.eval.ensemble's, whose boxes
join protocol 2's union: the paper's fusion), the classifier that ranks protocol 2's
classes from config.localisation.classifier, by default the run the box net started
from (its config.init_from: the paper initialised each box net from the classification
net of its scale and ranked with the classification nets). The data, protocols, scales and
batch size come from the command line's config.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from vgg_jax.config_values import string_list
from vgg_jax.data import transforms
from vgg_jax.evaluation.evaluator import EvalNet
from vgg_jax.evaluation.run import load_net
from vgg_jax.localisation import results
from vgg_jax.localisation.evaluator import BoxNet, LocalisationEvaluator
from vgg_jax.localisation.protocols import CENTRAL_CROP, DENSE
from vgg_jax.localisation.training import make_source
from vgg_jax.models import is_box_regressor, parameter_layers, select_layers

logger = logging.getLogger(__name__)


def load_box_net(path: str, step=None) -> tuple[BoxNet, ml_collections.ConfigDict]:
    """A box net from a workdir (its best checkpoint unless `step`), and its run config.

    Raises:
      ValueError: when the checkpoint is a classifier's.
    """
    net, run_config = load_net(path, step)
    if not is_box_regressor(run_config):
        raise ValueError(f"{path} holds a classifier, not a box net (its config has no "
                         "model.box_regression); evaluate it with a classification config.")
    return BoxNet(net, str(run_config.model.box_regression)), run_config


def fine_tuned(run_config: ml_collections.ConfigDict) -> str:
    """The layers a box net's training changed: results.ALL_LAYERS, or their names."""
    version = run_config.model.version
    frozen = set(select_layers(string_list(run_config.train.get("frozen_layers", ())), version))
    trained = [name for name in parameter_layers(version) if name not in frozen]
    if not frozen:
        return results.ALL_LAYERS
    return results.FC_LAYERS if trained == ["fc6", "fc7", "fc8"] else ", ".join(trained)


def classifier_path(config: ml_collections.ConfigDict, box_run: ml_collections.ConfigDict
                    ) -> str:
    """The classifier ranking protocol 2's classes (see the module docstring).

    Raises:
      ValueError: when neither config.localisation.classifier nor the box net's run names one.
    """
    path = config.localisation.get("classifier") or box_run.get("init_from") or ""
    if not path:
        raise ValueError(
            "Protocol 2 ranks classes with a classification net, and neither "
            "config.localisation.classifier nor the box net's run (config.init_from) names "
            "one; pass --config.localisation.classifier=<classifier workdir>.")
    return str(path)


def _load_classifier(path: str, classes: int) -> tuple[EvalNet, ml_collections.ConfigDict]:
    net, run_config = load_net(path)
    if is_box_regressor(run_config) or net.model.num_classes != classes:
        raise ValueError(
            f"config.localisation.classifier={path!r} is not a classifier of the box net's "
            f"{classes} classes; pass the classification run the box net started from.")
    return net, run_config


def _row(protocol, box_nets, runs, scales, classes, classifier, outcome) -> results.Row:
    return results.Row(
        protocol=protocol, nets=tuple(b.net.name for b in box_nets),
        versions=tuple(b.net.version for b in box_nets),
        regressions=tuple(b.regression for b in box_nets),
        fine_tuned=tuple(fine_tuned(r) for r in runs),
        train_scales=tuple(b.net.train_scale for b in box_nets), test_scales=tuple(scales),
        classes=classes, classifier=classifier, localisation_error=outcome.error,
        images=round(outcome.images))


def run_localisation(config: ml_collections.ConfigDict, workdir: str, step=None
                     ) -> tuple[results.Row, ...]:
    """Evaluates a box net (and config.eval.ensemble's) with config.localisation.protocols.

    Args:
      config: the run config (its data, eval and localisation sections are read).
      workdir: the box net's run directory; loc_results.json and .md are written there.
      step: checkpoint step (number, "best", "latest"; None: best if any, else latest).

    Returns:
      The rows (also printed).
    """
    main_net, main_run = load_box_net(workdir, step)
    loaded = [(main_net, main_run)] + [load_box_net(p) for p in string_list(config.eval.ensemble)]
    box_nets, runs = [b for b, _ in loaded], [r for _, r in loaded]
    classes = int(main_run.model.num_classes)
    source = make_source(config, str(config.data.eval_split))
    evaluator = LocalisationEvaluator(
        source, main_net.net.model.image_size, batch_size=int(config.eval.batch_size),
        num_threads=int(config.data.num_workers),
        dense_size_step=int(config.eval.dense_size_step),
        min_visible=float(config.localisation.min_visible),
        min_iou=float(config.localisation.merge_min_iou))
    rows, extra = [], {"faults": source.faults}
    if CENTRAL_CROP in config.localisation.protocols:
        for box_net, run in zip(box_nets, runs):
            q = transforms.single_test_scale(*box_net.net.train_scale)
            outcome = evaluator.central_crop(box_net, q)
            rows.append(_row(CENTRAL_CROP, [box_net], [run], (q,), classes, "", outcome))
            extra["ground_truth_boxes_clipped"] = outcome.clipped
            extra["undecodable"] = outcome.undecodable
    if DENSE in config.localisation.protocols:
        scales = tuple(int(q) for q in config.eval.scales) or tuple(sorted(
            {transforms.single_test_scale(*b.net.train_scale) for b in box_nets}))
        path = classifier_path(config, main_run)
        classifier, classifier_run = _load_classifier(path, classes)
        outcome = evaluator.dense(box_nets, classifier, scales,
                                  bool(classifier_run.eval.get("flip", True)))
        rows.append(_row(DENSE, box_nets, runs, scales, classes, classifier.name, outcome))
        extra["classifier"] = {"checkpoint": path, "step": classifier.step, "rows": [
            r.to_json() for r in outcome.classification]}
        extra["ground_truth_boxes_clipped"] = outcome.clipped
        extra["undecodable"] = outcome.undecodable
    if jax.process_index() == 0:
        print(results.format_results(rows))
        data = config.data.name if config.data.source == "tfds" else config.data.data_dir
        extra.update(split=f"{config.data.source}:{data or ''}:{config.data.eval_split}",
                     checkpoints=[os.path.abspath(workdir), *string_list(config.eval.ensemble)],
                     steps=[b.net.step for b in box_nets])
        path = results.write_results(workdir, rows, extra)
        logger.info("Wrote %s.", path)
    return tuple(rows)
