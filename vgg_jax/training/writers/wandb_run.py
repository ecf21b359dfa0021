"""The Weights & Biases writer, and how config.wandb.mode is resolved."""

from __future__ import annotations

import netrc
import os
import urllib.parse
from collections.abc import Mapping

import ml_collections

from vgg_jax.config_values import require
from vgg_jax.metric_names import STEP
from vgg_jax.training.writers.base import MetricWriter

# Remembers the wandb run id, so a restarted job resumes the same run.
WANDB_RUN_ID_FILENAME = "wandb_run_id.txt"
WANDB_MODES = ("online", "offline", "disabled", "auto")
_WANDB_DEFAULT_HOST = "https://api.wandb.ai"


def _wandb_api_key_configured() -> bool:
    """True if wandb has an API key: WANDB_API_KEY, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", _WANDB_DEFAULT_HOST)).hostname
    netrc_path = os.environ.get("NETRC", os.path.join(os.path.expanduser("~"), ".netrc"))
    try:
        return netrc.netrc(netrc_path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, PermissionError):
        return False


def check_config(wandb_config: ml_collections.ConfigDict) -> None:
    """The rules of config.wandb.

    Args:
      wandb_config: config.wandb.

    Raises:
      ConfigError: naming the field and its valid values.
    """
    require(wandb_config.mode in WANDB_MODES,
            f"config.wandb.mode={wandb_config.mode!r} is unknown; use one of {WANDB_MODES}.")


def resolve_wandb_mode(mode: str) -> str:
    """Turns config.wandb.mode into the mode handed to wandb.init.

    Args:
      mode: "online", "offline", "disabled", or "auto": the WANDB_MODE environment
        variable if set, else "online" when an API key is configured (WANDB_API_KEY or a
        netrc entry, as written by `wandb login`), else "offline".

    Returns:
      "online", "offline" or "disabled".

    """
    if mode != "auto":
        return mode
    from_env = os.environ.get("WANDB_MODE", "")
    if from_env in ("online", "offline", "disabled"):
        return from_env
    if from_env == "dryrun":  # wandb's old name for offline
        return "offline"
    return "online" if _wandb_api_key_configured() else "offline"


class WandbWriter(MetricWriter):
    """Logs to a Weights & Biases run whose files live in `<workdir>/wandb/`.

    The run id is kept in `<workdir>/wandb_run_id.txt`, so a job restarted in the same
    workdir continues the same run (resume="allow"). Every metric is charted against our
    own "step" (define_metric), not wandb's internal step, so values re-logged after a
    resume from an earlier checkpoint are kept instead of dropped as out of order.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, mode: str):
        """Args:
        config: the full config; reads config.wandb and logs the whole config to the run.
        workdir: the run's directory.
        mode: "online" or "offline" (resolved, see resolve_wandb_mode).
        """
        import wandb  # only imported when used: it is slow to import

        os.makedirs(workdir, exist_ok=True)
        id_path = os.path.join(workdir, WANDB_RUN_ID_FILENAME)
        run_id = None
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        wandb_config = config.wandb
        self._run = wandb.init(
            project=wandb_config.project or None,
            name=wandb_config.name or None,
            tags=list(wandb_config.tags) or None,
            dir=workdir,
            mode=mode,
            id=run_id,
            resume="allow",
            config=config.to_dict(),
            # Several writers (tests, or one per stage) may live in one process.
            reinit="create_new",
            # The console writer already reports progress; wandb's run summary at exit
            # would bury the last lines of training.
            settings=wandb.Settings(quiet=True),
        )
        if run_id is None:
            with open(id_path, "w") as f:
                f.write(self._run.id)
        self._defined: set[str] = set()

    @property
    def run(self):
        """The wandb Run (e.g. for its directory or id)."""
        return self._run

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name in scalars:
            if name not in self._defined and name != STEP:
                self._run.define_metric(name, step_metric=STEP)
                self._defined.add(name)
        self._run.log({STEP: int(step), **scalars})

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
