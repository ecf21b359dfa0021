"""The speed benchmark's parts with explicit settings (benchmarks/speed/, benchmarks/gpu/)."""

import pytest

from benchmarks.speed import loop, max_batch, peaks, report, settings


@pytest.mark.parametrize("largest", [16, 100, 128, 129, 300, 1000, 4096])
def test_max_batch_search_finds_the_largest_fitting_multiple(largest):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= largest

    good, bad = max_batch.search_max_batch(fits, start=128, granularity=16, limit=4096)
    assert good == largest // 16 * 16
    assert all(n % 16 == 0 for n in tried)
    # Doubling then bisection: a logarithmic number of tries, never the same size twice.
    assert len(tried) <= 2 * 9 and len(set(tried)) == len(tried)
    if largest >= 4096:
        assert bad is None
    else:
        assert bad is not None and bad - good <= 16 and bad > largest


def test_max_batch_search_when_nothing_fits_or_the_start_is_off_grid():
    assert max_batch.search_max_batch(lambda n: False, 128, 16, 4096) == (0, 16)
    tried = []
    max_batch.search_max_batch(lambda n: tried.append(n) or True, 100, 16, 300)
    assert tried == [96, 192]


def test_find_max_batch_logs_every_try_and_reports_the_search():
    lines = []
    found = max_batch.find_max_batch(settings.MaxBatchSettings(start=64, granularity=32,
                                                              limit=1024),
                                     lambda n: n <= 200, log=lines.append)
    assert found["max_batch_per_device"] == 192 and found["first_failing"] == 224
    assert not found["limit_reached"] and found["tried"]["256"] is False
    assert len(lines) == len(found["tried"]) and "RESOURCE_EXHAUSTED" in lines[-1]
    assert "192 per device" in report.max_batch_lines(found)[0]


def test_find_max_batch_stops_at_its_time_budget_with_a_lower_bound():
    now = [0.0]

    def fits(n):
        now[0] += 10.0  # every try takes 10 s
        return n <= 1000

    found = max_batch.find_max_batch(settings.MaxBatchSettings(start=128, granularity=16,
                                                              budget_s=25.0),
                                     fits, log=lambda line: None, clock=lambda: now[0])
    # Tried 128, 256, 512 (30 s), then the budget stopped it before 1024.
    assert found["tried"] == {"128": True, "256": True, "512": True}
    assert found["max_batch_per_device"] == 512 and not found["complete"]
    assert not found["limit_reached"] and found["first_failing"] is None
    assert "time budget" in report.max_batch_lines(found)[0]


def test_out_of_memory_errors_are_told_apart():
    assert max_batch.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while "
                                                   "trying to allocate 3.2GiB"))
    assert not max_batch.is_out_of_memory(ValueError("Incompatible shapes"))


@pytest.mark.parametrize(("kind", "dtype", "expected"), [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
    ("NVIDIA H100 80GB HBM3", "float32", 494.7),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H100 NVL", "float16", 835.0),
    ("NVIDIA H200", "bfloat16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "float32", 156.0),
    ("Tesla V100", "bfloat16", None),
])
def test_peak_table(kind, dtype, expected):
    assert peaks.known_peak_tflops(kind, dtype) == expected


def test_peak_and_mfu():
    assert peaks.peak_for("gpu", "NVIDIA H200", "bfloat16", 0.0) == 989.4
    assert peaks.peak_for("gpu", "NVIDIA H200", "bfloat16", 790.0) == 790.0
    assert peaks.peak_for("cpu", "cpu", "float32", 0.0) is None
    assert peaks.peak_for("cpu", "cpu", "float32", 2.0) == 2.0
    assert peaks.mfu(445.23, 989.4) == pytest.approx(0.45)
    assert peaks.mfu(1.0, None) is None


def test_loop_steps_outlast_the_workers_buffers():
    auto = settings.LoopSettings()
    assert loop.loop_steps(auto, steps=20, num_workers=14, prefetch_buffer_size=2) == 140
    assert loop.loop_steps(auto, steps=200, num_workers=14, prefetch_buffer_size=2) == 200
    assert loop.loop_steps(auto, steps=3, num_workers=0, prefetch_buffer_size=2) == 10
    fixed = settings.LoopSettings(loop_steps=7)
    assert loop.loop_steps(fixed, steps=20, num_workers=14, prefetch_buffer_size=2) == 7


@pytest.mark.parametrize(("args", "expected"), [
    ((0.95, 3.0, 1.0, 4.0, 1.0), "step"),   # fast enough, whatever the waits
    ((0.5, 3.0, 1.0, 4.0, 5.0), "step"),    # waited on the step most
    ((0.5, 3.0, 1.0, 4.0, 1.0), "data"),
    ((0.5, 1.0, 3.0, 4.0, 1.0), "transfer"),
    ((0.5, None, None, 4.0, 1.0), "input"),  # grain's prefetch: not split
])
def test_bound_by(args, expected):
    assert loop.bound_by(*args) == expected


def test_settings_parsing_names_the_bad_value():
    assert settings.parse_size("375x500") == (375, 500)
    assert settings.parse_feeders("thread, grain") == ("thread", "grain")
    with pytest.raises(ValueError, match="'375by500' is not HxW"):
        settings.parse_size("375by500")
    with pytest.raises(ValueError, match="choose from thread, grain, none"):
        settings.parse_feeders("thread,dali")


def test_apply_shape_writes_the_config():
    from configs import vgg_d

    config = vgg_d.get_config()
    settings.apply_shape(config, settings.RunShape(batch_size=64, image_size=288,
                                                   precision="bf16"), folder="/data/x")
    assert config.train.batch_size == 64 and config.data.image_size == 288
    assert config.model.compute_dtype == "bfloat16"
    assert config.data.train_scale_min >= 288
    assert (config.data.source, config.data.data_dir) == ("folder", "/data/x")


def test_train_run_rates_leave_out_start_up_and_validation_intervals():
    from benchmarks.gpu import train_run

    records = [
        {"step": 10, "train/loss": 1, "train/images_per_sec": 5.0},    # compile: out
        {"step": 20, "train/loss": 1, "train/images_per_sec": 100.0},
        {"step": 20, "val/top1_error": 0.5},
        {"step": 30, "train/loss": 1, "train/images_per_sec": 50.0},   # after validation: out
        {"step": 40, "train/loss": 1, "train/images_per_sec": 110.0},
        {"step": 50, "train/loss": 1, "train/images_per_sec": 7.0},    # restarted: out
        {"step": 60, "train/loss": 1, "train/images_per_sec": 120.0},
    ]
    assert train_run.clean_rates(records, restarts=(5,)) == [100.0, 110.0, 120.0]
    rates = train_run.rates(records, batch_size=10, restarts=(5,))
    assert rates["images_per_s_median"] == 110.0 and rates["steps_per_s_median"] == 11.0
    assert rates["log_intervals"] == 3


def test_step_fits_runs_the_real_step():
    # The search runs on GPUs only (the CLI skips it on a CPU); the step it tries runs here.
    from configs import vgg_a
    from vgg_jax.runtime import parallel

    config = vgg_a.get_config()
    config.model.width_divisor, config.model.fc_features = 16, 16
    settings.apply_shape(config, settings.RunShape(image_size=32), None)
    assert max_batch.step_fits(config, parallel.create_mesh(), 1)
