"""Localisation end to end on tiny canvases: the classifier, the box net started from it,
a resume that stays bit-exact, --mode=eval's two protocols and loc_results.json, drawn
predictions, and the protocols' errors on nets whose answers are known by construction."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import localisation as localisation_configs
from vgg_jax import config_checks, predict
from vgg_jax.data import decode, transforms
from vgg_jax.evaluation.evaluator import EvalNet
from vgg_jax.localisation import boxes, dense, run, training
from vgg_jax.localisation.evaluator import BoxNet, LocalisationEvaluator
from vgg_jax.localisation.source import LocalisationSource
from vgg_jax.models import BOX_COORDINATES, PER_CLASS, create_model
from vgg_jax.training import loop
from vgg_jax.weights import run_checkpoint

# Tiny canvases: the first 40 digits of each split (every class among them), one canvas each.
_DIGITS = 40


def _tiny(variant, data_dir, check_data=True, **changes):
    config = localisation_configs.get_config(variant)
    config.data.data_dir = str(data_dir)
    config.data.image_size = 32
    config.data.train_scale_min = config.data.train_scale_max = 48
    config.eval.scales = (48,)
    config.localisation.canvas.size = 48
    config.localisation.canvas.digit_min, config.localisation.canvas.digit_max = 18, 36
    config.localisation.canvas.copies = 1
    config.localisation.canvas.max_digits = _DIGITS
    config.model.width_divisor = 16
    config.model.fc_features = 32
    config.data.num_workers = 0
    config.train.batch_size = 8
    config.eval.batch_size = 16
    config.train.num_epochs = 2
    config.train.log_every_steps = 5
    config.wandb.mode = "disabled"
    config.progress_bar = False
    for path, value in changes.items():
        section, field = path.split(".") if "." in path else (None, path)
        (config[section] if section else config)[field] = value
    config_checks.validate_config(config, check_data=check_data)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A classifier (one epoch) and a box net started from it (two epochs)."""
    root = tmp_path_factory.mktemp("localisation")
    data_dir = root / "canvas"
    classifier = str(root / "cls")
    loop.train_and_evaluate(_tiny("digits_classifier", data_dir, **{"train.num_epochs": 1}),
                            classifier)
    box_net = str(root / "loc")
    config = _tiny("digits", data_dir, init_from=classifier)
    loop.train_and_evaluate(config, box_net)
    return {"data_dir": data_dir, "classifier": classifier, "box_net": box_net,
            "config": config}


def test_the_box_net_trains_validates_and_ranks_its_checkpoints(trained):
    records = [json.loads(line) for line in open(os.path.join(trained["box_net"],
                                                              "metrics.jsonl"))]
    validations = [r for r in records if "val/loc_error" in r]
    assert len(validations) == 2 and all(r["val/count"] == _DIGITS for r in validations)
    assert all(0 <= r["val/loc_error"] <= 1 and np.isfinite(r["val/loss"])
               for r in validations)
    trained_records = [r for r in records if "train/loss" in r]
    assert all("train/loc_error" in r and "train/dropped_crops" in r for r in trained_records)
    assert not any("train/top1_error" in r for r in records)
    # Checkpoints are ranked by the localisation error (the best step has the lowest).
    _, run_config, _ = run_checkpoint.load_checkpoint(trained["box_net"], "best")
    assert run_config.model.box_regression == PER_CLASS


def test_a_resume_continues_bit_exactly(trained, tmp_path):
    """One epoch, then the same command with two: the parameters of the uninterrupted run."""
    workdir = str(tmp_path / "resumed")
    data_dir, classifier = trained["data_dir"], trained["classifier"]
    loop.train_and_evaluate(
        _tiny("digits", data_dir, init_from=classifier, **{"train.num_epochs": 1}), workdir)
    loop.train_and_evaluate(_tiny("digits", data_dir, init_from=classifier), workdir)
    resumed, _, _ = run_checkpoint.load_checkpoint(workdir, "latest")
    reference, _, _ = run_checkpoint.load_checkpoint(trained["box_net"], "latest")
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)


def test_eval_runs_both_protocols_and_writes_loc_results(trained):
    config = _tiny("digits", trained["data_dir"], check_data=False)  # as --mode=eval checks
    rows = run.run_localisation(config, trained["box_net"])
    assert [r.protocol for r in rows] == ["central_crop", "dense"]
    with open(os.path.join(trained["box_net"], "loc_results.json")) as f:
        written = json.load(f)
    for row in written["rows"]:
        assert 0 <= row["localisation_error"] <= 100 and row["images"] == _DIGITS
        assert row["paper"] is None  # not the paper's net or data
    assert [r["paper_protocol"] for r in written["rows"]] == [1, 2]
    # The classifier named by the box net's init_from ranked protocol 2's classes.
    assert written["classifier"]["checkpoint"] == trained["classifier"]
    assert {p["table"] for p in written["paper"]} == {"Table 8", "Table 9", "Table 10"}


def test_predict_draws_the_guesses_into_an_image(trained, tmp_path):
    image = next(os.path.join(d, f) for d, _, files in os.walk(trained["data_dir"] / "val")
                 for f in files)
    results = predict.localise(trained["box_net"], [image], str(tmp_path / "drawn"))
    (result,) = results
    assert os.path.isfile(result["drawn"]) and len(result["guesses"]) == 5
    for guess in result["guesses"]:
        xmin, ymin, xmax, ymax = guess["box"]
        assert 0 <= xmin <= xmax <= 47 and 0 <= ymin <= ymax <= 47
    assert "box [" in predict.format_predictions(results)


def test_a_classification_workdir_is_not_a_box_net(trained, tmp_path):
    with pytest.raises(ValueError, match="holds a classifier, not a box net"):
        predict.localise(trained["classifier"], [], str(tmp_path))


# ----------------------------------------------------------------------------------------
# Known answers: a box net whose box is always its whole window.
# ----------------------------------------------------------------------------------------


def _constant_net(num_classes, bias):
    """A width/16 net whose last layer ignores its input: fc8 = bias."""
    model = create_model("A", num_classes=num_classes, image_size=32, width_divisor=16,
                         fc_features=8)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    params = dict(variables["params"])
    params["fc8"] = {"kernel": jnp.zeros_like(params["fc8"]["kernel"]),
                     "bias": jnp.asarray(bias, jnp.float32)}
    return EvalNet("constant", model, {"params": params}, (0.0, 0.0, 0.0))


def _source(tmp_path, truth):
    """48 x 48 images of class 0 with the given pixel boxes."""
    import io

    from PIL import Image

    from vgg_jax.data import sources

    for i in range(len(truth)):
        os.makedirs(tmp_path / "val" / "0", exist_ok=True)
        buffer = io.BytesIO()
        Image.new("RGB", (48, 48), (50, 50, 50)).save(buffer, "PNG")
        (tmp_path / "val" / "0" / f"{i}.png").write_bytes(buffer.getvalue())
    images = sources.FolderSource(str(tmp_path), "val")
    return LocalisationSource(images, np.arange(len(truth)), np.array(truth, np.float32),
                              np.arange(len(truth) + 1), {})


def test_the_protocols_score_known_boxes(tmp_path):
    # At Q = 48 a 48 x 48 image keeps its size; its central 32 crop is pixels 8-39. Its
    # dense view (cropped to a multiple of 32) is that crop too: one output location.
    q, window = 48, (8, 8, 39, 39)
    mapped = dense.view_boxes(np.array([[[0.5, 0.5, 1.0, 1.0]]]), 48, 48, q, (32, 32), 32)
    np.testing.assert_allclose(mapped[0, 0], window)
    source = _source(tmp_path, [window, (0, 0, 9, 9)])  # one right, one far off
    whole_window = np.tile([0.5, 0.5, 1.0, 1.0], 3)  # every class's box, PCR with 3 classes
    box_net = BoxNet(_constant_net(3 * BOX_COORDINATES, whole_window), PER_CLASS)
    evaluator = LocalisationEvaluator(source, 32, batch_size=8, num_threads=0,
                                      dense_size_step=32)
    outcome = evaluator.central_crop(box_net, q)
    assert (outcome.correct, outcome.images, outcome.error) == (1, 2, 50.0)
    assert outcome.loss == pytest.approx(0.0, abs=1e-9) and outcome.loss_count == 1
    # Protocol 2 at Q = 48 (one location, the central window): the classifier ranks class 0
    # last of three, still within the 5 guesses.
    classifier = _constant_net(3, [0.0, 2.0, 1.0])
    dense_outcome = evaluator.dense([box_net], classifier, (q,), classifier_flip=False)
    assert (dense_outcome.correct, dense_outcome.images) == (1, 2)
    (classification,) = dense_outcome.classification
    assert classification.top1_error == 100.0 and classification.top5_error == 0.0


# ----------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------


def test_config_mistakes_of_a_box_net_fail_in_one_sentence(tmp_path):
    config = localisation_configs.get_config("digits")
    config.localisation.merge_min_iou = 0.0
    with pytest.raises(config_checks.ConfigError, match="merge_min_iou=0.0 must be in"):
        config_checks.validate_config(config, check_data=False)
    config = localisation_configs.get_config("digits")
    config.train.plateau_monitor = "val/top1_error"
    with pytest.raises(config_checks.ConfigError, match="is a classification metric"):
        config_checks.validate_config(config, check_data=False)
    config = localisation_configs.get_config("imagenet-384")
    config.data.data_dir = str(tmp_path)
    config.init_from = str(tmp_path)
    with pytest.raises(config_checks.ConfigError, match="train_annotations is not set"):
        training.check_data(config)
    config = localisation_configs.get_config("digits_classifier")
    config.model.box_regression = "boxes"
    with pytest.raises(config_checks.ConfigError, match="box_regression='boxes' is unknown"):
        config_checks.validate_config(config, check_data=False)
    with pytest.raises(ValueError, match="Unknown variant"):
        localisation_configs.get_config("imagenet-512")


def test_the_imagenet_variants_follow_the_paper():
    for variant, scale in (("imagenet", 256), ("imagenet-256", 256), ("imagenet-384", 384)):
        config = localisation_configs.get_config(variant)
        assert (config.model.version, config.model.box_regression) == ("D", PER_CLASS)
        assert config.data.train_scale_min == config.data.train_scale_max == scale
        assert config.train.learning_rate == 1e-3 and config.init_from_required
        assert (config.train.batch_size, config.train.momentum,
                config.train.weight_decay, config.model.dropout_rate) == (256, 0.9, 5e-4, 0.5)
        config.data.data_dir = "/data/tensorflow_datasets"
        config_checks.validate_config(config, check_data=False)


def test_boxes_of_a_crop_placement_and_back_agree_with_decode():
    # The crop placement the transform reports is decode's own geometry.
    placement = transforms.CropPlacement(500, 375, *decode.rescaled_size(500, 375, 256), 10,
                                         5, 224, False)
    assert (placement.rescaled_width, placement.rescaled_height) == (341, 256)
    edges = boxes.to_crop(np.array([0.0, 0.0, 500.0, 375.0]), placement)
    np.testing.assert_allclose(edges, [-10, -5, 331, 251], atol=1e-9)


def test_a_config_without_the_localisation_section_is_refused():
    from configs import quickstart

    config = quickstart.get_config()
    config.model.box_regression = PER_CLASS
    with pytest.raises(config_checks.ConfigError, match="has no localisation section"):
        config_checks.validate_config(config, check_data=False)


def test_the_box_net_has_four_outputs_per_class_or_four_in_all():
    from vgg_jax.models import create_model_from_config

    config = localisation_configs.get_config("digits")
    assert create_model_from_config(config).num_classes == 40
    config.model.box_regression = "single_class"
    assert create_model_from_config(config).num_classes == 4
