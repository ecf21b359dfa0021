"""Reading list-valued config fields the way people type them on the command line.

ml_collections parses `--config.eval.ensemble=runs/a,runs/b` into the one-element tuple
("runs/a,runs/b",) for a tuple-of-strings field, while `--config.eval.ensemble="('runs/a',
'runs/b')"` gives two elements; both spellings mean the same list.
"""

from __future__ import annotations

from collections.abc import Iterable


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
