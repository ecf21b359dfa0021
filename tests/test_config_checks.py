"""Bad configs fail before any work, with one sentence naming the field and the fix."""

import os
import subprocess
import sys

import pytest

from configs import base, quickstart, small_datasets, vgg_a, vgg_a_lrn, vgg_b, vgg_c, vgg_d, vgg_e
from vgg_jax.config_checks import ConfigError, command_line_mistake, validate_config
from vgg_jax.data import testing, transforms
from vgg_jax.training.run_state import check_resumable
from vgg_jax.weights import run_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(config, device_count=4, process_count=1):
    validate_config(config, device_count=device_count, process_count=process_count,
                    check_data=False)


@pytest.mark.parametrize("module", [vgg_a, vgg_a_lrn, vgg_b, vgg_c, vgg_d, vgg_e])
def test_paper_configs_hold_the_paper_recipe(module):
    config = module.get_config()
    config.data.data_dir = "/data"
    _check(config, device_count=8)
    assert config.train.batch_size == 256
    assert config.train.momentum == 0.9
    assert config.train.weight_decay == 5e-4
    assert config.train.learning_rate == 1e-2
    assert config.model.dropout_rate == 0.5
    assert config.train.num_epochs == 74
    assert config.data.image_size == 224
    assert config.data.train_scale_min == config.data.train_scale_max == 256
    assert config.model.version == module.__name__.split("vgg_")[-1].upper()


def test_training_scale_variants():
    jittered = vgg_d.get_config("256-512")
    assert (jittered.data.train_scale_min, jittered.data.train_scale_max) == (256, 512)
    assert transforms.single_test_scale(jittered.data.train_scale_min,
                                        jittered.data.train_scale_max) == 384
    fixed = vgg_d.get_config("384")
    assert fixed.data.train_scale_min == fixed.data.train_scale_max == 384
    assert fixed.train.learning_rate == 1e-3
    with pytest.raises(ValueError, match="'256', '384' or '256-512'"):
        vgg_d.get_config("300")


def test_quickstart_config_is_valid():
    _check(quickstart.get_config())


def _broken(**changes):
    config = base.get_config()
    config.data.data_dir = "/data"
    for path, value in changes.items():
        section, field = path.split("__")
        config[section][field] = value
    return config


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"model__version": "F"}, r"config\.model\.version='F' is not a VGG configuration"),
        ({"train__batch_size": 250}, r"config\.train\.batch_size=250 .* not divisible by the 4 devices"),
        ({"train__grad_accum_steps": 3}, r"config\.train\.batch_size=256 is not divisible by config\.train\.grad_accum_steps=3"),
        ({"train__grad_accum_steps": 0}, r"config\.train\.grad_accum_steps=0 must be at least 1"),
        ({"data__train_scale_min": 200}, r"config\.data\.train_scale_min=200 is smaller than the crop"),
        ({"data__image_size": 200}, r"config\.data\.image_size=200 must be a positive multiple of 32"),
        ({"data__data_dir": None}, r"config\.data\.data_dir is not set for source 'tfds'"),
        ({"data__source": "csv"}, r"config\.data\.source='csv' is unknown"),
        ({"model__initializer": "he"}, r"config\.model\.initializer='he' is unknown"),
        ({"wandb__mode": "loud"}, r"config\.wandb\.mode='loud' is unknown"),
        ({"train__learning_rate": 0.0}, r"config\.train\.learning_rate=0\.0 must be positive"),
        ({"eval__protocol": "ten_crop"}, r"config\.eval\.protocol='ten_crop' is unknown"),
        ({"eval__scales": (128, 256)}, r"config\.eval\.scales holds 128, smaller than the crop"),
        ({"eval__scales": ("abc",)}, r"config\.eval\.scales holds 'abc', not a whole number"),
        ({"eval__dense_size_step": -32}, r"config\.eval\.dense_size_step=-32 must be at least 1"),
        ({"eval__batch_size": 0}, r"config\.eval\.batch_size=0 must be positive"),
        ({"data__colour_shift_std": -1.0}, r"config\.data\.colour_shift_std=-1\.0 must be >= 0"),
        ({"data__prefetch_buffer_size": 0}, r"config\.data\.prefetch_buffer_size=0 must be"),
        ({"data__device_prefetch": -1}, r"config\.data\.device_prefetch=-1 must be 0"),
        ({"checkpoint__keep_best": -1}, r"config\.checkpoint\.keep_best=-1 must be 0 or more"),
        ({"train__plateau_patience": 0}, r"config\.train\.plateau_patience must be an integer"),
        ({"train__plateau_monitor": "train/loss"}, r"config\.train\.plateau_monitor='train/loss'"
                                                   r" must be one of the validation metrics"),
    ],
)
def test_bad_fields_are_named(changes, expected):
    with pytest.raises(ConfigError, match=expected):
        _check(_broken(**changes))


def test_missing_data_directory_is_reported(tmp_path):
    config = _broken(data__source="folder", data__data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="nowhere"):
        validate_config(config, device_count=1)


def test_main_fails_fast_with_one_sentence(tmp_path):
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/vgg_d.py",
         f"--workdir={tmp_path}", "--config.model.version=Z",
         "--config.data.data_dir=/data"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode != 0
    assert "Config error: config.model.version='Z' is not a VGG configuration" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "caltech101"])
def test_small_data_set_configs_are_valid(name):
    config = small_datasets.get_config(name)
    config.data.data_dir = "/data"
    _check(config)
    assert config.data.name == name and config.data.eval_split == "test"


def test_one_class_is_refused_in_one_sentence(tmp_path):
    # Fine-tuning takes the class count from the folder: one class would train to loss 0
    # and "100% accuracy".
    testing.write_folder(str(tmp_path / "one"), {"train": 2, "val": 1}, classes=("cat",))
    config = quickstart.get_config()
    config.data.source, config.data.data_dir = "folder", str(tmp_path / "one")
    config.model.num_classes = 1
    with pytest.raises(ConfigError, match=r"^The training data \(.*one/train\) has 1 class; a "
                       r"classifier needs two or more \(one folder per class: "
                       r"train/<class>/\*\)\.$"):
        validate_config(config, device_count=1)


def test_class_count_must_match_the_data(tmp_path):
    config = quickstart.get_config()
    config.data.cache_dir = str(tmp_path)
    config.model.num_classes = 1000
    with pytest.raises(ConfigError, match=r"config\.model\.num_classes=1000 but the data set "
                                          r"has 10 classes; pass --config\.model\.num_classes=10"):
        validate_config(config, device_count=1)


def test_a_resume_under_other_settings_names_every_difference():
    saved = run_checkpoint.config_to_json(vgg_a.get_config())
    config = vgg_a.get_config()
    config.model.version = "a"  # the same net, spelled otherwise
    config.train.num_epochs = 100  # may change: the run goes on longer
    check_resumable(saved, config, "runs/vgg_a")
    config.train.batch_size = 128
    config.data.num_workers = 0
    with pytest.raises(ConfigError, match=r"runs/vgg_a holds a run saved with other settings, "
                                          r"config\.data\.num_workers=0 \(saved: 8\); "
                                          r"config\.train\.batch_size=128 \(saved: 256\)"):
        check_resumable(saved, config, "runs/vgg_a")


@pytest.mark.parametrize("arguments, expected", [
    (["--config.train.batch_size.x=3"],
     "a --config override names the field 'x', which config.train.batch_size does not have."),
    (["--config.trian.batch_size=3"],
     "a --config override names the field 'trian', which the config does not have; did you "
     "mean 'train' (--config.train)?"),
    (["--config.data.nope=3"], "a --config override names the field 'nope', which config.data "
                               "does not have; its fields are "),
    (["--confg.train.batch_size=1"],
     "--confg.train.batch_size is not a flag; did you mean --config.train.batch_size?"),
    (["--config", "configs/missing.py"],
     "--config=configs/missing.py: there is no file 'configs/missing.py'; pass one of configs/"),
    (["--config=configs/quickstart.py:foo"],
     "configs/quickstart.py has no variants, so ':foo' selects nothing; drop it"),
    (["--config=configs/vgg_d.py:999"], "Unknown training scale '999'"),
    # Right fields, whatever their values (ml_collections parses those), and other flags.
    (["--config=configs/vgg_d.py:384", "--config.train.batch_size=abc", "--mode=eval"], ""),
])
def test_command_line_mistakes_are_named_as_typed(arguments, expected):
    mistake = command_line_mistake(["main.py", *arguments], os.path.join(ROOT, "configs",
                                                                          "quickstart.py"))
    assert mistake.startswith(expected) and bool(mistake) == bool(expected), mistake


@pytest.mark.parametrize("arguments, expected", [
    (["--config.train.batchsize=1"], "Config error: a --config override names the field "
                                     "'batchsize', which the config does not have; did you "
                                     "mean 'batch_size' (--config.train.batch_size)?"),
    # The same through a --config file, whose fields are looked up while flags are parsed.
    (["--config=configs/vgg_d.py", "--config.train.batchsize=1"],
     "Config error: a --config override names the field 'batchsize', which the config does "
     "not have; did you mean 'batch_size' (--config.train.batch_size)?"),
    (["--config=configs/vgg_d.py:999"], "Config error: Unknown training scale '999'"),
    (["--config.train.batch_size=abc"], "Config error: flag --config.train.batch_size=abc: "),
    # Evaluation has no training batch to split over the 4 devices: it goes on to the
    # missing checkpoint.
    (["--mode=eval", "--config.train.batch_size=7"], "Error: Checkpoint path "),
    (["--num_processes=2"], "Multi-host error: --num_processes=2 needs --coordinator_address"),
])
def test_main_reports_bad_input_in_one_line(tmp_path, arguments, expected):
    result = subprocess.run(
        [sys.executable, "main.py", f"--workdir={tmp_path / 'run'}", *arguments],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode != 0
    # absl's INFO lines aside, the whole output is one sentence.
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("I")]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("stage", ["384", "256-512"])
def test_fine_tuning_stages_need_init_from_or_an_explicit_from_scratch(stage):
    config = vgg_d.get_config(stage)
    config.data.data_dir = "/nonexistent"
    with pytest.raises(ConfigError, match=r"fine-tuning stages .*--config\.init_from=<workdir>, "
                       r"or --config\.init_from_required=False"):
        validate_config(config, device_count=4)
    # Either choice gets past this rule (to the data check, which fails here).
    for choice in ({"init_from": "runs/vgg_d"}, {"init_from_required": False}):
        chosen = vgg_d.get_config(stage)
        chosen.data.data_dir = "/nonexistent"
        chosen.update(choice)
        with pytest.raises(ConfigError) as error:
            validate_config(chosen, device_count=4)
        assert "init_from_required" not in str(error.value)
    # S=256 is the paper's from-scratch stage.
    assert not vgg_d.get_config("256").init_from_required
