"""`main.py --mode=eval`: a workdir's checkpoint or any weights (and an ensemble) evaluated
and recorded."""

from __future__ import annotations

import logging

import jax
import ml_collections

from vgg_jax.config_values import string_list
from vgg_jax.data import sources
from vgg_jax.evaluation import results
from vgg_jax.evaluation.evaluator import EvalNet, Evaluator
from vgg_jax.evaluation.protocols import Protocol, scales_for
from vgg_jax.models import canonical_version, create_model_from_config
from vgg_jax.weights import specs

logger = logging.getLogger(__name__)

# Data fields that, when they differ from the checkpoint's run, mean another data set.
_DATA_IDENTITY_FIELDS = ("source", "name", "data_dir", "eval_split")


def load_net(spec: str, step: int | str | None = None
             ) -> tuple[EvalNet, ml_collections.ConfigDict]:
    """An EvalNet from any weights spec (see vgg_jax.weights.specs): a workdir or weight
    directory, a weight file, a hub model.

    Args:
      spec: a workdir (DIR or DIR@STEP), a .safetensors/.npz/.pth/.caffemodel file,
        hf-hub:ORG/NAME[@REVISION] or a shorthand such as vgg16.
      step: a workdir's checkpoint step (number, "best", "latest"; None: best if any,
        else latest).

    Returns:
      (the net, its run config: the checkpoint's, or the weights' description).
    """
    variables, run_config, chosen_step = specs.load(spec, step)
    d = run_config.data
    net = EvalNet(
        name=f"{run_config.model.version} ({specs.short_name(spec)})",
        model=create_model_from_config(run_config), variables=variables,
        mean_rgb=tuple(d.mean_rgb), std_rgb=tuple(d.get("std_rgb", (1.0, 1.0, 1.0))),
        train_scale=(int(d.train_scale_min), int(d.train_scale_max)), step=chosen_step,
        version=canonical_version(run_config.model.version),
    )
    return net, run_config


def _load_ensemble(config: ml_collections.ConfigDict, spec: str, step):
    net, run_config = load_net(spec, step)
    _warn_about_other_data(run_config, config)
    nets = [net]
    for path in string_list(config.eval.ensemble):
        try:
            nets.append(load_net(path)[0])
        except ValueError as error:
            raise ValueError(f"config.eval.ensemble names {path!r}: {error}") from None
    train_scales = {n.train_scale for n in nets}
    if not config.eval.scales and len(train_scales) > 1:
        # The paper's test scales follow from S, and every net here sees the same views.
        raise ValueError(
            f"config.eval.ensemble mixes nets trained at different scales S "
            f"{sorted(train_scales)}, so the paper's test scales are ambiguous; set "
            "config.eval.scales explicitly (e.g. --config.eval.scales=256,384,512).")
    return nets


def run_evaluation(
    config: ml_collections.ConfigDict, workdir: str, step: int | str | None = None,
    weights: str | None = None,
) -> tuple[results.Row, ...]:
    """Evaluates the workdir's checkpoint, or other weights (and config.eval.ensemble),
    on the eval split.

    The nets, their preprocessing and their training scale S come from the checkpoints'
    own configs; the protocol, scales, batch size and data set come from `config`.

    Args:
      config: the run config (config.eval and config.data are read).
      workdir: the run's directory (or a weight directory); results are written here.
      step: checkpoint step (number, "best", "latest"; None: best if any, else latest).
      weights: a spec of the net to evaluate instead of the workdir's checkpoint (a hub
        model, a weight file, another run; see vgg_jax.weights.specs).

    Returns:
      The result rows (also printed, and written as eval_results.json / .md).
    """
    ev = config.eval
    nets = _load_ensemble(config, weights or workdir, step)
    scales = scales_for(nets[0].train_scale, bool(ev.multi_scale), ev.scales)
    source = sources.make_source(config.data, str(config.data.eval_split))
    data_classes = sources.num_classes(config.data)
    for n in nets:
        if n.model.num_classes != data_classes:
            raise ValueError(
                f"Net {n.name} has {n.model.num_classes} classes but the data set "
                f"({config.data.source}: {config.data.get('name', '')}) has {data_classes}; "
                "evaluate it on the data it was trained for.")
    evaluator = Evaluator(
        source, Protocol.from_config(ev, scales), nets[0].model.image_size,
        batch_size=int(ev.batch_size),
        # Decoding threads: the workers' budget of training (PIL releases the GIL).
        num_threads=int(config.data.num_workers), progress_bar=bool(config.progress_bar))
    evaluation = evaluator.run(nets)
    if jax.process_index() == 0:
        print(results.format_table(evaluation.rows))
        print(evaluation.summary())
        data_name = config.data.name if config.data.source == "tfds" else config.data.data_dir
        extra = {"split": f"{config.data.source}:{data_name or ''}:{config.data.eval_split}",
                 "checkpoints": [weights or workdir, *string_list(ev.ensemble)],
                 "steps": [n.step for n in nets], "protocol": str(ev.protocol)}
        results.write_results(workdir, evaluation, extra)
    return evaluation.rows


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
