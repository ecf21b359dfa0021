"""Reading config fields the way people type them, and the error a bad one raises.

`ConfigError` and `require` are what every component's `check_config(section)` uses, so
`config_checks.validate_config` can report any field's mistake the same way.

ml_collections parses `--config.eval.ensemble=runs/a,runs/b` into the one-element tuple
("runs/a,runs/b",) for a tuple-of-strings field, while `--config.eval.ensemble="('runs/a',
'runs/b')"` gives two elements; both spellings mean the same list.
"""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A config field has a value the run cannot use; the message is one sentence that
    names the field and the fix."""


def require(condition: bool, message: str) -> None:
    """Raises ConfigError(message) unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def string_list(values: str | Iterable[str]) -> list[str]:
    """Flattens a string or a sequence of strings, splitting each on commas.

    Args:
      values: e.g. ("runs/a,runs/b",), ("runs/a", "runs/b") or "runs/a,runs/b".

    Returns:
      The non-empty, stripped items, in order: ["runs/a", "runs/b"].
    """
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in str(value).split(",") if item.strip()]
