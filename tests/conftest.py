"""Test-wide settings: four forced CPU devices, so data-parallel code runs as on a GPU host,
and one compilation cache for the session."""

import os
import shutil
import tempfile

# Must be set before jax is first imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Dozens of tests, and the training runs they start as subprocesses (which inherit the
# environment), compile the same small programs again and again: jax's persistent
# compilation cache, shared by the session and started empty so that a run compiles
# everything once, saves about 40% of a small training run's CPU time. Every entry is
# kept, however quick its compilation. A size limit (never reached) turns on jax's file
# lock around each read and write: without it, a process of a two-process test could read
# an entry the other is still writing.
_SESSION_CACHE = tempfile.mkdtemp(prefix="vgg_jax_tests_jax_cache-")
_CACHE_LIMIT_BYTES = 16 << 30
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _SESSION_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(_CACHE_LIMIT_BYTES))


def pytest_sessionfinish(session, exitstatus):
    del session, exitstatus
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
