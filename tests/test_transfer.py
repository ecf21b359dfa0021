"""The transfer protocol (Appendix B): the descriptor against a direct computation, the
aggregations and metrics, and the command end to end on the digits, cache included."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import normalize
from sklearn.svm import LinearSVC

from configs import quickstart
from vgg_jax import convert, models
from vgg_jax.data.testing import ArrayImages, png_bytes
from vgg_jax.evaluation.evaluator import EvalNet
from vgg_jax.preprocess import normalize_images
from vgg_jax.training import loop
from vgg_jax.transfer import classify, descriptors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)


def _net():
    model = models.create_model("A", num_classes=5, image_size=32, width_divisor=16,
                                fc_features=16)
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    return EvalNet("A", model, variables, MEAN, STD, (32, 32))


def test_descriptor_is_fc7_averaged_over_positions_and_the_flip():
    net = _net()
    rng = np.random.default_rng(0)
    # Shorter side 64 at Q=64: the image is used as it is (no resampling), 64x96.
    images = [rng.integers(0, 256, (64, 96, 3), np.uint8) for _ in range(3)]
    source = ArrayImages(images + [b"not an image"], [0, 1, 2, 3])
    out, labels, decoded = descriptors.compute(net, source, [64], flip=True, batch_size=8,
                                               num_threads=0)
    assert out.shape == (4, 1, 16) and decoded.tolist() == [True, True, True, False]
    assert labels.tolist()[:3] == [0, 1, 2]
    for i, image in enumerate(images):
        x = normalize_images(np.stack([image, image[:, ::-1]]), MEAN, STD)
        fc7 = net.model.apply(net.variables, x, dense=True, outputs=("fc7",))["fc7"]
        assert fc7.shape[1:3] == (2, 3)  # a 2x3 pool5 map and FC6 1x1 (32-pixel crops)
        np.testing.assert_allclose(out[i, 0], np.mean(fc7, axis=(0, 1, 2)), rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="smaller than the net's crop size 32"):
        descriptors.compute(net, source, [16])


def test_aggregations_are_l2_normalised_and_stacking_keeps_every_scale():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    average, stack = classify.aggregate(x, "average"), classify.aggregate(x, "stack")
    assert average.shape == (2, 4) and stack.shape == (2, 12)
    np.testing.assert_allclose(np.linalg.norm(stack, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(average[1], x[1].mean(0) / np.linalg.norm(x[1].mean(0)),
                               rtol=1e-6)


def test_metrics():
    labels = np.array([0, 0, 0, 0, 1, 2])
    predicted = np.array([0, 0, 0, 1, 1, 0])
    # Class 0: 3/4, class 1: 1/1, class 2: 0/1; accuracy would be 4/6.
    assert classify.mean_class_recall(labels, predicted) == pytest.approx((0.75 + 1 + 0) / 3)
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.2], [0.1, 0.4]])
    # Class 0 ranks its positives first (AP 1); class 1's come 2nd and 3rd: (1/2 + 2/3) / 2.
    expected = (1 + (1 / 2 + 2 / 3) / 2) / 2
    assert classify.mean_average_precision(targets, scores) == pytest.approx(expected)


def test_single_label_data_is_scored_by_mean_class_recall():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 120)
    x = np.eye(4)[y] + 0.1 * rng.standard_normal((120, 4))  # separable: every class recalled
    x = classify.aggregate(x[:, None, :], "average")
    metric, value = classify.fit_and_score(x[:90], y[:90], x[90:], y[90:], c=1.0)
    assert metric == classify.MEAN_CLASS_RECALL and value == pytest.approx(1.0)


def test_multi_label_data_is_scored_by_map():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (80, 3))
    x = y + 0.1 * rng.standard_normal((80, 3))  # separable: every class's AP is 1
    metric, value = classify.fit_and_score(x[:60], y[:60], x[60:], y[60:], c=1.0)
    assert metric == classify.MEAN_AP and value == pytest.approx(1.0)


def _svm_balanced_accuracy(train, test, aggregation):
    """The protocol's last stage written directly with scikit-learn: aggregate the scales,
    L2-normalise, fit a linear SVM (C = 1, configs/transfer.py), balanced accuracy."""
    def features(split):
        x = split["descriptors"][split["decoded"]]
        x = x.mean(axis=1) if aggregation == "average" else x.reshape(len(x), -1)
        return normalize(x), split["labels"][split["decoded"]]

    (train_x, train_y), (test_x, test_y) = features(train), features(test)
    svm = LinearSVC(C=1.0, random_state=0).fit(train_x, train_y)
    return balanced_accuracy_score(test_y, svm.predict(test_x))


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return dict(env, JAX_PLATFORMS="cpu", WANDB_MODE="disabled")


def test_command_on_the_digits_then_from_the_cache(tmp_path):
    config = quickstart.get_config()
    config.model.width_divisor, config.model.fc_features = 16, 32
    config.data.cache_dir, config.data.num_workers = str(tmp_path / "cache"), 0
    config.train.num_epochs, config.progress_bar, config.wandb.mode = 2, False, "disabled"
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)

    command = [sys.executable, "-m", "vgg_jax.transfer", f"--workdir={workdir}",
               "--config=configs/transfer.py:digits", f"--json={tmp_path / 'rows.json'}",
               f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.transfer.num_threads=0"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=_env())
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    rows = json.load(open(tmp_path / "rows.json"))
    assert [r["aggregation"] for r in rows] == ["average", "stack"]
    assert all(r["metric"] == "mean_class_recall" and r["test_images"] == 360 for r in rows)
    assert "Caltech-101  mean class recall   92.7" in first.stdout
    assert "computed, cached in" in first.stderr
    # The rows are the SVM's score on the cached descriptors, recomputed here with
    # scikit-learn's own balanced accuracy (= mean class recall). No bound on the value:
    # a net trained for two epochs is barely above chance, and how far depends on luck.
    cached = {name.split("-")[0]: np.load(os.path.join(workdir, "transfer", name))
              for name in os.listdir(os.path.join(workdir, "transfer"))}
    assert sorted(cached) == ["train", "val"]
    assert cached["train"]["descriptors"].shape == (1437, 3, 32)  # images, Q=32,48,64, fc7
    for row in rows:
        assert row["value"] == pytest.approx(
            100 * _svm_balanced_accuracy(cached["train"], cached["val"], row["aggregation"]),
            abs=1e-9)

    # Another C, and the net's descriptors stacked with another net's (here itself, as the
    # paper stacks Net-D's and Net-E's): everything read back from the cache.
    second = subprocess.run(command + ["--config.transfer.svm_c=0.5",
                                       f"--config.transfer.combine={workdir}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=_env())
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert second.stderr.count("(cached ") == 4  # two nets x two splits, nothing recomputed
    assert "Descriptors at Q=" not in second.stderr
    assert "A (run) & A (run)" in second.stdout

    # The same net as a weight file (any weights spec works): its own cache under
    # data.cache_dir, and the very rows of the run's directory.
    weights = str(tmp_path / "exported.safetensors")
    convert.export_file(workdir, weights)
    from_file = [arg for arg in command if not arg.startswith("--workdir=")]
    third = subprocess.run(from_file + [f"--weights={weights}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=_env())
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    assert os.path.isdir(tmp_path / "cache" / "transfer" / "exported")
    file_rows = json.load(open(tmp_path / "rows.json"))
    assert [r["value"] for r in file_rows] == pytest.approx([r["value"] for r in rows], abs=1e-6)
    both = subprocess.run(command + [f"--weights={weights}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=_env())
    assert both.returncode != 0 and "one of the two" in both.stderr


def test_multi_label_tfds_split_through_mock_data():
    import tensorflow_datasets as tfds

    from vgg_jax.data.testing import smooth_image
    from vgg_jax.transfer.multilabel import MultiLabelTfds

    rng = np.random.default_rng(0)
    records = [{"image": png_bytes(smooth_image(rng, 40, 48)), "labels": np.array(labels)}
               for labels in ([0], [3, 19], [], [3])]

    def as_data_source(builder, split, decoders=None, **kwargs):
        return records

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        source = MultiLabelTfds("voc/2007", "test", None, "labels")
    assert source.multi_hot.shape == (4, 20)  # VOC's 20 classes, from the builder's features
    assert source.multi_hot[1, [3, 19]].tolist() == [1, 1] and source.multi_hot[2].sum() == 0
    out, _, decoded = descriptors.compute(_net(), source, [40], flip=False, num_threads=0)
    assert decoded.all() and out.shape == (4, 1, 16)
