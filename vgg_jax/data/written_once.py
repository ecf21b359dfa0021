"""A folder generated from settings and written once (the digits, the localisation
canvases): built in a temporary directory beside its place and renamed into it, so a run
killed half-way never leaves a partial folder; later runs and other processes reuse it
while its manifest (the settings it was written with) matches, and it is rebuilt when
they change."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any


def read_manifest(root: str, manifest: str) -> dict[str, Any] | None:
    """The settings a folder was written with, or None (no folder, no or bad manifest)."""
    try:
        with open(os.path.join(root, manifest)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_once(root: str, settings: dict[str, Any], write: Callable[[str, dict], None],
               manifest: str) -> bool:
    """Makes `root` hold what `write` writes for `settings`, unless it already does.

    Args:
      root: the folder's place.
      settings: what the content depends on (JSON-serialisable); saved as the manifest.
      write: (folder, settings) -> None, writes the content into an empty folder.
      manifest: the manifest's file name inside the folder.

    Returns:
      Whether this call wrote the folder (False: it was already there).
    """
    if read_manifest(root, manifest) == settings:
        return False
    parent = os.path.dirname(os.path.abspath(root))
    name = os.path.basename(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=parent)
    try:
        write(tmp, settings)
        # The manifest last: a folder with one is complete.
        with open(os.path.join(tmp, manifest), "w") as f:
            json.dump(settings, f, indent=1, sort_keys=True)
        if os.path.exists(root):
            # Stale settings (or a folder not written by us): moved aside first, since a
            # rename cannot replace a non-empty directory.
            old = tempfile.mkdtemp(prefix=f".{name}-old-", dir=parent)
            os.rename(root, os.path.join(old, name))
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process won the race: its folder does if it has these settings.
            if read_manifest(root, manifest) != settings:
                raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
