"""The prepared GPU run (benchmarks/gpu/run_all.py) end to end on the CPU at tiny shapes,
so that its first GPU run cannot fail on a typo or a missing import. No timing asserted."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

from benchmarks.gpu import run_all

# The files the run promises (docs/benchmarks.md), and the device tool's limit on them.
EXPECTED = {"env.json", "d_bf16.json", "nets.json", "loop.json", "max_batch.json",
            "train_run.json", "run_all.log"}
MAX_FILES = 8


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_part_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu/run_all.py", f"--out={out}", "--tiny"],
        capture_output=True, text=True, timeout=run_all.TINY_WALL_LIMIT_S + 60)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert set(os.listdir(out)) == EXPECTED and len(EXPECTED) <= MAX_FILES
    assert all((out / name).is_file() for name in EXPECTED)  # flat: no sub-folders
    read = {name: json.loads((out / name).read_text()) for name in EXPECTED
            if name.endswith(".json")}

    env = read["env.json"]
    assert env["tiny"] and env["versions"]["jax"] and env["devices"]["backend"] == "cpu"
    assert set(env["parts"]) == {p.name for p in run_all.PARTS}
    assert all(p["status"] == "ok" for p in env["parts"].values()), env["parts"]
    assert env["dev_shm"]["workers"] == 1 and "/dev/shm" in env["dev_shm"]["line"]

    # Each part's JSON is written the moment a figure exists, not when the part ends.
    writes = {name: [w["what"] for w in part["writes"]] for name, part in env["parts"].items()}
    for name, part in env["parts"].items():
        assert len(part["writes"]) >= 2 and part["writes"][0]["t_s"] < part["wall_s"], name
    assert writes["loop"] == ["step", "loop, feeder thread", "loop, feeder grain",
                              "loop, feeder none", "done"]
    assert writes["nets"] == ["VGG-E bf16", "VGG-A bf16", "VGG-B bf16", "VGG-C bf16",
                              "VGG-D fp32"]
    assert writes["train_run"] == ["first process", "done"]
    assert writes["max_batch"][0] == "max-batch estimate"

    # One compilation cache for all parts: the loop finds the step d_bf16 compiled.
    compiles = {name: part["compiles"] for name, part in env["parts"].items()}
    assert compiles["d_bf16"]["cache_lookups"] >= 1 and compiles["d_bf16"]["cache_hits"] == 0
    assert compiles["loop"]["cache_hits"] >= 1
    assert compiles["d_bf16"]["programs"] >= 2 and _positive(compiles["d_bf16"]["compile_s"])

    d = read["d_bf16.json"]
    assert d["step"]["precision"] == "bfloat16" and _positive(d["step"]["images_per_s"])
    assert "torch" in d  # timed, or skipped with the reason

    nets = read["nets.json"]["nets"]
    assert set(nets) == {"D_fp32", "A_bf16", "B_bf16", "C_bf16", "E_bf16"}
    assert nets["D_fp32"]["precision"] == "float32"
    assert all(_positive(n["images_per_s"]) for n in nets.values())

    loop = read["loop.json"]["loop"]
    assert list(loop["feeders"]) == ["thread", "grain", "none"]
    assert all(_positive(f["fraction_of_synthetic"]) for f in loop["feeders"].values())
    # Each feeder's pipeline lets its workers' shared memory go before the next starts:
    # what the process has mapped from /dev/shm falls back after every feeder.
    feeders = list(loop["feeders"].values())
    assert all(f["dev_shm_during"]["bytes"] > f["dev_shm_after"]["bytes"] for f in feeders)
    assert all(f["dev_shm_after"] == feeders[0]["dev_shm_after"] for f in feeders), feeders

    max_batch = read["max_batch.json"]
    assert max_batch["max_batch"] is None  # the search is skipped on a CPU ...
    estimate = max_batch["max_batch_estimate"]  # ... its estimate is not
    assert _positive(estimate["bytes_per_example"]) and _positive(estimate["fixed_bytes"])
    assert estimate["estimate_per_device"] == int(
        (estimate["memory_bytes"] - estimate["fixed_bytes"]) // estimate["bytes_per_example"])

    train = read["train_run.json"]
    assert train["ok"], train
    assert train["sigterm_after_step"] and train["checkpoints_after_sigterm"]
    assert train["resumed"] and train["final_checkpoint_step"] == train["total_steps"]
    assert train["validations"] >= 1 and _positive(train["steps_per_s_median"])
    assert all(_positive(s) for s in train["first_log_s"])


def test_a_gpu_run_without_a_gpu_stops_before_any_part(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "benchmarks/gpu/run_all.py", f"--out={out}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("run_all: jax ") and "sees no GPU, only" in last, last
    assert "x cpu (backend cpu" in last
    assert "no part was run" in last
    assert set(os.listdir(out)) == {"env.json", "run_all.log"}
    env = json.loads((out / "env.json").read_text())
    assert env["parts"] == {} and env["devices"]["backend"] == "cpu"


def test_the_package_uses_no_private_jax_api():
    # The GPU image runs another jax (0.11) than the pins: only public names may be used.
    private = re.compile(r"\bjax\.(_src|interpreters|lib|core)\b|(import|from) jaxlib\b")
    found = [f"{path}:{n}" for root in ("vgg_jax", "benchmarks", "main.py")
             for path in (pathlib.Path(root).rglob("*.py") if os.path.isdir(root)
                          else [pathlib.Path(root)])
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if private.search(line.split("#")[0])]
    assert not found, found
