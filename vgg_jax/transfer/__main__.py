"""python -m vgg_jax.transfer: Appendix B's protocol for one checkpoint on one data set.

  python -m vgg_jax.transfer --workdir=runs/vgg_d --config=configs/transfer.py:caltech101 \
      --config.data.data_dir=~/tensorflow_datasets
  python -m vgg_jax.transfer --workdir=runs/quickstart --config=configs/transfer.py:digits
  python -m vgg_jax.transfer --weights=vgg16 --config=configs/transfer.py:voc2007 ...

The net comes from any weights spec (docs/weights.md): a run's directory, a weight file,
hf-hub:ORG/NAME or a shorthand such as vgg16.

Prints one row per aggregation (average, stack) with the data set's metric, the paper's
Net-D & Net-E figure beside it; --json also writes them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from vgg_jax.config_values import string_list
from vgg_jax.data import sources
from vgg_jax.evaluation.run import load_net
from vgg_jax.runtime import console
from vgg_jax.transfer import classify, descriptors, paper
from vgg_jax.transfer.multilabel import MultiLabelTfds
from vgg_jax.weights import specs

_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "transfer.py")


def define_flags() -> None:
    """The command's flags (defined when run, so that importing this module defines none)."""
    config_flags.DEFINE_config_file("config", _CONFIG, "Transfer config (configs/transfer.py"
                                    ":caltech101, :voc2007, :digits).", lock_config=True)
    flags.DEFINE_string("weights", None, "The net: any weights spec (vgg16 ... vgg19_bn, "
                        "hf-hub:ORG/NAME[@REVISION], a .safetensors, .npz, .pth or .caffemodel "
                        "file, a run's DIR[@STEP]).")
    flags.DEFINE_string("workdir", None, "A run or weight directory (the same as --weights).")
    flags.DEFINE_string("step", None, "Checkpoint step: a number, 'best' or 'latest'.")
    flags.DEFINE_string("json", None, "Also write the result rows to this JSON file.")


def check_config(config) -> None:
    """Fails before any work, in one sentence naming the field, on values that cannot work.

    Args:
      config: the transfer config.

    Raises:
      ValueError: naming the field and the fix.
    """
    t = config.transfer
    if not t.scales or any(int(q) <= 0 for q in t.scales):
        raise ValueError("config.transfer.scales must hold positive test scales, e.g. "
                         "--config.transfer.scales=256,384,512.")
    unknown = [a for a in t.aggregations if a not in classify.AGGREGATIONS]
    if unknown or not t.aggregations:
        raise ValueError(f"config.transfer.aggregations={tuple(t.aggregations)} must name some of "
                         f"{classify.AGGREGATIONS}.")
    if t.svm_c <= 0:
        raise ValueError(f"config.transfer.svm_c={t.svm_c} must be positive.")
    if config.data.label_key != "label" and config.data.source != "tfds":
        raise ValueError("config.data.label_key other than 'label' (multi-label data) needs "
                         "config.data.source='tfds'.")


def cache_dir_of(config, spec: str) -> str:
    """Where a net's descriptors are cached: config.transfer.cache_dir if set, else
    <DIR>/transfer for a run's (or weights') directory, else
    <config.data.cache_dir>/transfer/<the spec's short name>.

    Args:
      config: the transfer config.
      spec: the net's weights spec.

    Returns:
      The directory (user-expanded).
    """
    if config.transfer.cache_dir:
        return os.path.expanduser(config.transfer.cache_dir)
    parsed = specs.parse(spec)
    if parsed.kind == specs.RUN:
        return os.path.join(parsed.location, "transfer")
    return os.path.join(os.path.expanduser(config.data.cache_dir), "transfer",
                        specs.short_name(spec))


def _identity(spec: str) -> str:
    """The spec as the cache key holds it: a run's directory or a file as an absolute path,
    a hub net as its repository (vgg16 and hf-hub:timm/vgg16.tv_in1k share descriptors)."""
    parsed = specs.parse(spec)
    return parsed.location if parsed.kind == specs.HUB else os.path.abspath(parsed.location)


def split_descriptors(config, net, spec: str, step: int, split: str):
    """The cached (or new) descriptors, labels and decoded mask of one split."""
    d, t = config.data, config.transfer
    multi = d.label_key != "label"
    key = {"checkpoint": _identity(spec), "step": step, "source": d.source,
           "name": d.name, "data_dir": d.data_dir, "split": split, "label_key": d.label_key,
           "scales": [int(q) for q in t.scales], "flip": bool(t.flip), "layer": t.layer,
           "dense_size_step": int(t.dense_size_step)}
    path = descriptors.cache_path(cache_dir_of(config, spec), split, key)

    def compute():
        source = (MultiLabelTfds(d.name, split, d.data_dir, d.label_key) if multi
                  else sources.make_source(d, split))
        x, labels, decoded = descriptors.compute(
            net, source, [int(q) for q in t.scales], flip=bool(t.flip), layer=str(t.layer),
            batch_size=int(t.batch_size), dense_size_step=int(t.dense_size_step),
            num_threads=int(t.num_threads))
        return x, (source.multi_hot if multi else labels), decoded

    start = time.perf_counter()
    x, labels, decoded, cached = descriptors.load_or_compute(path, compute)
    logging.info("%s: %d images, descriptors %s in %.1f s (%s).", split, int(decoded.sum()),
                 x.shape, time.perf_counter() - start, f"cached {path}" if cached else
                 f"computed, cached in {path}")
    return x, labels, decoded


def _descriptors_of_nets(config, nets, split: str):
    """One split's descriptors, the nets' stacked along the features (the paper's Net-D &
    Net-E), over the images every net could decode."""
    parts = [split_descriptors(config, net, path, net.step, split) for path, net in nets]
    decoded = np.logical_and.reduce([part[2] for part in parts])
    x = np.concatenate([part[0] for part in parts], axis=-1)
    return x[decoded], parts[0][1][decoded]


def run(config, spec: str, step=None) -> list[dict]:
    """Descriptors of both splits, an SVM per aggregation, rows with the paper's figure.

    With config.transfer.combine, the other nets' descriptors are stacked with this one's
    (the paper's Net-D & Net-E).

    Args:
      config: the transfer config.
      spec: the net's weights spec (a run's directory, a weight file, a hub name).
      step: a run's checkpoint step (None: best if any, else latest).

    Returns:
      One dict per aggregation: metric, value (%), images, SVM seconds, the paper's figure.
    """
    nets = [(spec, load_net(spec, step)[0])]
    for path in string_list(config.transfer.combine):
        try:
            nets.append((path, load_net(os.path.expanduser(path))[0]))
        except ValueError as error:
            raise ValueError(f"config.transfer.combine names {path!r}: {error}") from None
    name = " & ".join(net.name for _, net in nets)
    train_x, train_y = _descriptors_of_nets(config, nets, config.data.train_split)
    test_x, test_y = _descriptors_of_nets(config, nets, config.data.eval_split)
    reference = paper.paper_data_set(config.data.name) if config.data.source == "tfds" else None
    rows = []
    for how in config.transfer.aggregations:
        start = time.perf_counter()
        metric, value = classify.fit_and_score(
            classify.aggregate(train_x, how), train_y, classify.aggregate(test_x, how), test_y,
            float(config.transfer.svm_c), int(config.seed))
        rows.append({"net": name, "step": nets[0][1].step, "aggregation": how,
                     "scales": [int(q) for q in config.transfer.scales],
                     "flip": bool(config.transfer.flip), "metric": metric,
                     "value": 100 * value, "train_images": len(train_y),
                     "test_images": len(test_y), "svm_seconds": time.perf_counter() - start,
                     "paper": paper.NET_D_AND_E.get(reference)})
    return rows


def format_rows(rows: Sequence[dict], data_name: str) -> str:
    """The results table, and the paper's Net-D & Net-E figures under it."""
    width = max([28] + [len(r["net"]) for r in rows])
    lines = [f"{'net':<{width}} {'aggregation':<11} {'scales':<14} {'metric':<18} {'ours %':>7}",
             "-" * (width + 54)]
    for r in rows:
        scales = ",".join(str(q) for q in r["scales"])
        lines.append(f"{r['net']:<{width}} {r['aggregation']:<11} {scales:<14} "
                     f"{r['metric']:<18} {r['value']:7.2f}")
    reference = paper.paper_data_set(data_name)
    lines.append("Paper (Appendix B, Net-D & Net-E, linear SVM):" + (
        "" if reference else f" (no figure for {data_name}; its four data sets follow)"))
    for name, (metric, value, how) in paper.NET_D_AND_E.items():
        if reference in (None, name):
            lines.append(f"  {name:<12} {metric:<18} {value:5.1f}   {how}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    """Command line (see the module docstring)."""
    if len(argv) > 1:
        sys.exit(f"Unexpected arguments: {' '.join(argv[1:])}.")
    console.quiet_library_logs()
    f = flags.FLAGS
    if bool(f.weights) == bool(f.workdir):
        sys.exit("Pass the net as --weights=SPEC (a run's directory, a weight file, vgg16, "
                 "hf-hub:ORG/NAME) or --workdir=DIR, one of the two.")
    try:
        config = f.config
        check_config(config)
        rows = run(config, os.path.expanduser(f.weights or f.workdir), f.step)
    except ValueError as error:
        sys.exit(f"Transfer failed: {error}")
    print(format_rows(rows, str(config.data.name)))
    fits = ", ".join(f"{r['svm_seconds']:.1f} s" for r in rows)
    print(f"SVM fits: {fits} "
          f"({rows[0]['train_images']} training, {rows[0]['test_images']} test images).")
    if f.json:
        with open(f.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
