"""The speed benchmark's parts with explicit settings (benchmarks/speed/, benchmarks/gpu/)."""

import importlib.util
import json
import os

import pytest

from benchmarks.speed import (
    compiles,
    json_out,
    loop,
    max_batch,
    peaks,
    report,
    settings,
    shared_memory,
    torch_compare,
)


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


def test_max_batch_search_from_an_estimate_brackets_it_by_the_growth_factor():
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 430

    # From the estimate 416 in steps of 15%: 416 fits, 448 (416 x 1.15 = 478 on the
    # 32-grid) does not, and nothing on the grid lies between.
    assert max_batch.search_max_batch(fits, 416, 32, 4096, growth=1.15) == (416, 448)
    assert tried == [416, 448]
    tried.clear()
    # An estimate 30% too high: shrinks by 15% until a size fits, then bisects.
    assert max_batch.search_max_batch(fits, 608, 32, 4096, growth=1.15) == (416, 448)
    assert tried[0] == 608 and len(tried) <= 5 and len(set(tried)) == len(tried)


def test_max_batch_estimate_recovers_the_plans_line():
    def plan(n):  # 1.2 GB fixed + 150 MB per example, as XLA's plan of D roughly says
        return 1_200_000_000 + 150_000_000 * n

    found = max_batch.estimate_max_batch(plan, (64, 128), 60_000_000_000)
    assert found["fixed_bytes"] == 1_200_000_000
    assert found["bytes_per_example"] == 150_000_000
    assert found["estimate_per_device"] == 392  # (60 - 1.2) GB / 150 MB = 392
    assert found["planned_bytes"] == {"64": plan(64), "128": plan(128)}
    assert max_batch.estimate_max_batch(plan, (64, 128), 1_000_000_000)[
        "estimate_per_device"] == 0
    assert max_batch.search_start(found, settings.MaxBatchSettings(granularity=32)) == 384
    assert max_batch.search_start(None, settings.MaxBatchSettings(start=96)) == 96
    with pytest.raises(ValueError, match="smaller first"):
        max_batch.estimate_max_batch(plan, (128, 64), 1)


def test_find_max_batch_reports_every_try_as_it_happens():
    reports = []
    found = max_batch.find_max_batch(
        settings.MaxBatchSettings(start=384, granularity=32, growth=1.15),
        lambda n: n <= 400, log=lambda line: None, on_try=reports.append)
    assert found["max_batch_per_device"] == 384 and found["complete"]
    assert len(reports) == len(found["tried"]) and not any(r["complete"] for r in reports)
    assert reports[0]["tried"] == {"384": True} and reports[0]["max_batch_per_device"] == 384


def test_planned_peak_counts_a_donated_output_once():
    plan = {"argument_bytes": 100, "output_bytes": 90, "alias_bytes": 80, "temp_bytes": 50}
    assert max_batch.planned_peak_bytes(plan) == 160


def test_settings_parse_two_plan_sizes():
    assert settings.parse_sizes("64,128") == (64, 128)
    for bad in ("64", "128,64", "0,8", "a,b"):
        with pytest.raises(ValueError, match="batch sizes"):
            settings.parse_sizes(bad)


def test_shared_memory_mapped_reads_the_dev_shm_lines_of_a_maps_listing(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000100000 rw-s 00000000 00:1a 12 /dev/shm/vgg_jax_ring_ab (deleted)\n"
        "7f0000100000-7f0000101000 rw-s 00000000 00:1a 13 /dev/shm/sem.mp-x\n"
        "7f0000101000-7f0000102000 rw-s 00000000 00:1a 13 /dev/shm/sem.mp-x\n"
        "7f0000200000-7f0000300000 r-xp 00000000 08:01 99 /usr/lib/libc.so.6\n"
        "7f0000300000-7f0000400000 rw-p 00000000 00:00 0 \n")
    assert shared_memory.mapped(str(maps)) == {"blocks": 2, "bytes": 0x100000 + 2 * 0x1000}
    assert shared_memory.mapped(str(tmp_path / "none")) == {"blocks": 0, "bytes": 0}


@pytest.mark.parametrize(("free", "expected"), [
    (None, 14), (100 << 30, 14), (2 << 30, 7), (200 << 20, 0),
])
def test_data_workers_are_cut_to_what_dev_shm_holds(free, expected):
    assert shared_memory.workers_that_fit(14, 256 << 20, free) == expected


def test_a_gpu_shape_worker_needs_its_ring_of_batches():
    from configs import vgg_d
    from vgg_jax.data import pipeline

    data = vgg_d.get_config().data
    data.image_size, data.prefetch_buffer_size = 224, 2
    # 5 batches (2 x 2 buffered + the one being made) of 256 x 224 x 224 x 3 bytes: the 14
    # workers of the GPU run hold 2.5 GiB at once.
    assert pipeline.worker_shared_memory_bytes(data, 256) == 5 * 256 * 224 * 224 * 3


def test_json_out_rewrites_the_file_whole_at_every_figure(tmp_path):
    path = tmp_path / "part.json"
    lines = []
    out = json_out.JsonOut(str(path), {"command": "x"}, extra=lambda: {"n": len(lines)},
                           say=lines.append)
    out.add("step", {"images_per_s": 1.0}, "step")
    assert json.loads(path.read_text()) == {"command": "x", "step": {"images_per_s": 1.0},
                                            "n": 0}
    out.add("loop", {"feeders": {}}, "loop, feeder thread")
    assert set(json.loads(path.read_text())) == {"command", "step", "loop", "n"}
    assert lines == [f"wrote {path} (step)", f"wrote {path} (loop, feeder thread)"]
    assert os.listdir(tmp_path) == ["part.json"]  # no partial file left beside it
    json_out.JsonOut(None).add("step", {}, "step")  # no path: nothing written


def test_compile_record_counts_this_process_compilations():
    import jax
    import numpy as np

    record = compiles.CompileRecord()
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
    found = record.summary()
    assert found["programs"] >= 1 and found["compile_s"] > 0
    assert found["slowest"]["name"].startswith("jit(")


@pytest.mark.parametrize(("found", "words"), [
    ({"jax": "0.11.2", "backend": "gpu", "count": 1, "kind": "NVIDIA H100 80GB HBM3"}, None),
    ({"jax": "0.11.2", "backend": "cpu", "count": 1, "kind": "cpu",
      "cuda_error": "Unable to initialize backend 'cuda': CUDA_ERROR_NO_DEVICE"},
     "sees no GPU, only 1 x cpu (backend cpu; cuda: Unable to initialize backend"),
    ({"error": "TimeoutExpired: ..."}, "could not list its devices"),
])
def test_a_gpu_run_stops_with_one_line_when_jax_sees_no_gpu(found, words):
    from benchmarks.gpu import header

    line = header.no_gpu(found)
    assert (line is None) if words is None else (words in line and "\n" not in line)


def test_torch_required_on_cuda_is_skipped_at_once_without_a_gpu():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    from configs import vgg_a

    config = vgg_a.get_config()
    config.model.width_divisor, config.model.fc_features = 16, 16
    settings.apply_shape(config, settings.RunShape(batch_size=2, image_size=32), None)
    found = torch_compare.run_torch(config, steps=1, warmup=0, compile_model=False,
                                    require_cuda=True)
    assert "sees no CUDA device" in found["skipped"] or "not importable" in found["skipped"]


def test_the_gpu_runs_budgets_fit_one_device_command():
    from benchmarks.gpu import run_all

    total = sum(p.budget_s for p in run_all.PARTS)
    assert total + run_all.HEADER_ALLOWANCE_S + run_all.FINISH_RESERVE_S <= run_all.WALL_LIMIT_S
    assert run_all.WALL_LIMIT_S < run_all.DEVICE_COMMAND_LIMIT_S
    assert [p.name for p in run_all.PARTS] == ["d_bf16", "torch", "loop", "train_run", "nets",
                                               "max_batch"]
