"""VGG weights on the Hugging Face hub: `hf-hub:ORG/NAME[@REVISION]` and the shorthands.

`vgg11` ... `vgg19` and their `_bn` twins stand for `hf-hub:timm/<name>.tv_in1k`:
torchvision's ImageNet weights as timm publishes them (safetensors in timm's layout, and a
`config.json` whose `pretrained_cfg` gives the input normalisation and crop). Files are
fetched with huggingface_hub, so its cache (HF_HOME, HF_HUB_CACHE), offline mode
(HF_HUB_OFFLINE=1), endpoint (HF_ENDPOINT), token and progress bar all apply; a revision
(branch, tag or commit) pins what is loaded.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, NamedTuple

import huggingface_hub
from huggingface_hub import errors

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
# The files of a timm model repo that we read: the weights and timm's config.
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# torchvision's ImageNet weights on the hub, as timm names them (vgg16 -> vgg16.tv_in1k).
SHORTHAND_REPO = "timm/{name}.tv_in1k"
SHORTHANDS = tuple(f"vgg{depth}{bn}" for depth in (11, 13, 16, 19) for bn in ("", "_bn"))
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class HubSpec(NamedTuple):
    """A model repo on the hub and the revision to read (None: its default branch)."""

    repo_id: str
    revision: str | None

    def __str__(self) -> str:
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


class HubWeights(NamedTuple):
    """What was fetched: the local path of the weights and timm's config (or None)."""

    weights_path: str
    config: dict[str, Any] | None


def parse(spec: str) -> HubSpec | None:
    """Reads a hub spec: a shorthand (vgg16, vgg16_bn, ...) or hf-hub:ORG/NAME[@REVISION].

    Args:
      spec: what the user wrote.

    Returns:
      The HubSpec, or None when `spec` is neither form.

    Raises:
      ValueError: for an hf-hub: spec whose repo id is not ORG/NAME.
    """
    if spec.lower() in SHORTHANDS:
        return HubSpec(SHORTHAND_REPO.format(name=spec.lower()), None)
    if not spec.startswith(HUB_PREFIX):
        return None
    repo_id, _, revision = spec[len(HUB_PREFIX):].partition("@")
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"{spec!r} does not name a hub repo; write hf-hub:ORG/NAME or "
                         "hf-hub:ORG/NAME@REVISION (e.g. hf-hub:timm/vgg16.tv_in1k).")
    return HubSpec(repo_id, revision or None)


def fetch_command(spec: HubSpec) -> str:
    """The command that puts a repo's files into the hub cache on a connected machine."""
    revision = f" --revision={spec.revision}" if spec.revision else ""
    return f"hf download {spec.repo_id} {WEIGHTS_FILE} {CONFIG_FILE}{revision}"


def fetch(spec: HubSpec) -> HubWeights:
    """Downloads (or finds in the cache) a repo's weights and timm's config.

    Args:
      spec: the repo and revision.

    Returns:
      HubWeights: the cached weights file, and config.json's content when the repo has one.

    Raises:
      ValueError: one sentence for a repo, revision or file the hub does not have, or, when
        offline and not cached, with the command that fetches it on a connected machine.
    """
    weights = _download(spec, WEIGHTS_FILE)
    try:
        config_path = _download(spec, CONFIG_FILE)
    except ValueError as error:
        # Any repo in timm's layout will do; without timm's config, torchvision's
        # preprocessing is assumed (and said).
        logger.warning("%s; assuming torchvision's preprocessing.", error)
        return HubWeights(weights, None)
    with open(config_path, encoding="utf-8") as f:
        return HubWeights(weights, json.load(f))


def _download(spec: HubSpec, filename: str) -> str:
    try:
        return huggingface_hub.hf_hub_download(spec.repo_id, filename, revision=spec.revision)
    except errors.LocalEntryNotFoundError:
        raise ValueError(
            f"{spec} ({filename}) is not in the Hugging Face cache and the hub cannot be "
            f"reached (offline, or HF_HUB_OFFLINE=1); run `{fetch_command(spec)}` on a "
            "connected machine with the same HF_HOME (or copy its hub cache here).") from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"{spec}: the repo has no revision {spec.revision!r}.") from None
    except errors.RepositoryNotFoundError:
        raise ValueError(f"{spec}: no such model repo on the hub (or it is private or gated "
                         "and no token with access was given).") from None
    except errors.EntryNotFoundError:
        raise ValueError(f"{spec} has no {filename}; vgg-jax reads a VGG's weights as "
                         f"{WEIGHTS_FILE} (safetensors, timm's or torchvision's keys).") from None
