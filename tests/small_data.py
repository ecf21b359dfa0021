"""Configs of small data sets for the tests, built from the experiment configs (which the
library itself never imports)."""

from __future__ import annotations

from typing import Any

from configs import base


def data_config(**overrides: Any) -> Any:
    """config.data of the base config shrunk for tests (32x32 crops, no workers)."""
    config = base.get_config().data
    config.image_size = 32
    config.train_scale_min = config.train_scale_max = 40
    config.num_workers = 0
    config.prefetch_buffer_size = 1
    for key, value in overrides.items():
        setattr(config, key, value)
    return config
