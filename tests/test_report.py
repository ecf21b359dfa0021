"""Our evaluations next to the paper's tables: which setting matches which figure."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
import small_data

from configs import base
from vgg_jax.data import testing
from vgg_jax.evaluation import paper, report, results
from vgg_jax.evaluation.run import run_evaluation
from vgg_jax.models import create_model
from vgg_jax.weights import run_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JITTERED = (256, 512)


def row(versions, train_scales, test_scales, protocol):
    return results.Row(nets=tuple(versions), versions=tuple(versions),
                       train_scales=tuple(train_scales), test_scales=tuple(test_scales),
                       protocol=protocol, top1_error=30.0, top5_error=10.0, images=1)


@pytest.mark.parametrize("setting, expected", [
    (row(["D"], [(256, 256)], [256], "dense"), ("Table 3", 27.0, 8.8)),
    (row(["A_LRN"], [(256, 256)], [256], "dense"), ("Table 3", 29.7, 10.5)),
    (row(["C"], [(384, 384)], [384], "dense"), ("Table 3", 28.1, 9.3)),
    (row(["E"], [JITTERED], [384], "dense"), ("Table 3", 25.5, 8.0)),
    (row(["D"], [(256, 256)], [224, 256, 288], "dense"), ("Table 4", 26.6, 8.6)),
    (row(["B"], [(256, 256)], [224, 256, 288], "dense"), ("Table 4", 28.2, 9.6)),
    (row(["D"], [JITTERED], [256, 384, 512], "dense"), ("Table 5", 24.8, 7.5)),
    (row(["D"], [JITTERED], [256, 384, 512], "multi_crop"), ("Table 5", 24.6, 7.5)),
    (row(["E"], [JITTERED], [256, 384, 512], "dense+multi_crop"), ("Table 5", 24.4, 7.1)),
    (row(["E", "D"], [JITTERED, JITTERED], [256, 384, 512], "dense+multi_crop"),
     ("Table 6", 23.7, 6.8)),
])
def test_each_paper_setting_finds_its_figure(setting, expected):
    assert paper.paper_result(setting) == paper.PaperResult(*expected)


@pytest.mark.parametrize("setting", [
    row(["D"], [(256, 256)], [256], "single_crop"),  # the paper's tables are dense or multi-crop
    row(["D"], [(256, 256)], [384], "dense"),  # a test scale the paper did not use for S=256
    row(["A"], [(256, 256)], [224, 256, 288], "dense"),  # A was not tested at several scales
    row(["D"], [(256, 256)], [224, 256, 288], "multi_crop"),  # multi-crop only for jittered nets
    row(["D", "E"], [(256, 256), (256, 256)], [224, 256, 288], "dense+multi_crop"),  # not Table 6's nets
    row(["D"], [(32, 32)], [32], "dense"),  # a small-image run
    row([], [(256, 256)], [256], "dense"),  # a net of unknown version
])
def test_settings_the_paper_does_not_report_find_none(setting):
    assert paper.paper_result(setting) is None


def test_report_gathers_the_newest_evaluations_of_a_run(tmp_path):
    # A narrow net D recorded as trained at S=256: its dense evaluation at Q=256 is the
    # setting of the paper's Table 3, its single crop none of the paper's.
    config = base.get_config()
    config.model.version = "D"
    config.model.num_classes = 4
    config.model.width_divisor, config.model.fc_features = 32, 16
    config.model.compute_dtype = "float32"
    config.data = small_data.data_config(source="folder", data_dir=str(tmp_path / "data"),
                                      eval_split="val")
    config.data.image_size = 32
    config.data.train_scale_min = config.data.train_scale_max = 256
    config.eval.batch_size = 8
    config.progress_bar = False
    testing.write_folder(str(tmp_path / "data"), {"train": 1, "val": 1}, size=(40, 56),
                         classes=("c0", "c1", "c2", "c3"))
    model = create_model("D", num_classes=4, image_size=32, width_divisor=32, fc_features=16)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    workdir = str(tmp_path / "run")
    run_checkpoint.save_variables(workdir, {"params": params}, config, step=7)

    config.eval.protocol = "dense"
    run_evaluation(config, workdir)
    config.eval.protocol = "single_crop"
    run_evaluation(config, workdir)
    run_evaluation(config, workdir)  # the same setting again: reported once

    rows = report.read_history(workdir)
    assert [r.row.protocol for r in rows] == ["dense", "single_crop", "single_crop"]
    assert all(r.steps == (7,) and r.row.versions == ("D",) for r in rows)
    text = report.build_report([workdir])
    assert text.startswith("2 settings evaluated, 1 with a figure in the paper")
    table_lines = [line for line in text.splitlines() if line.startswith("| D (run)")]
    assert len(table_lines) == 2
    assert "| dense |" in table_lines[0] and "| Table 3 | 27.0 | 8.8 |" in table_lines[0]
    assert "| single_crop |" in table_lines[1] and "| - | - | - |" in table_lines[1]

    out = str(tmp_path / "report.md")
    result = subprocess.run([sys.executable, "-m", "vgg_jax.evaluation.report",
                             f"--workdir={workdir}", f"--out={out}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert open(out).read().strip() == text
    missing = subprocess.run([sys.executable, "-m", "vgg_jax.evaluation.report",
                              f"--workdir={tmp_path}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert missing.returncode == 1 and "evaluate the run first" in missing.stderr
