"""Experiment loggers chosen by ``logger=``: wandb (default), csv, tensorboard, none.

W&B runs online only when credentials are present; otherwise, or when the service cannot
be reached, it logs offline into the run folder (``wandb sync`` uploads it later). A
tracker failure never fails training: results.json is written locally regardless.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

log = logging.getLogger(__name__)


def wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc()
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def build_logger(cfg: dict, save_dir: str | Path, run_name: str, config: dict | None = None):
    """Return a Lightning logger (or None) for ``cfg`` (the ``logger`` config group)."""
    kind = cfg.get("kind", "none")
    save_dir = str(save_dir)
    if kind == "none":
        return None
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir, name="csv", version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir, name="tensorboard", version="")
    if kind == "wandb":
        return _wandb_logger(cfg, save_dir, run_name, config)
    raise ValueError(f"logger.kind={kind!r}")


def _wandb_logger(cfg: dict, save_dir: str, run_name: str, config: dict | None):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    mode = cfg.get("mode", "auto")
    if mode == "auto":
        mode = "online" if wandb_credentials() and os.environ.get("WANDB_MODE") != "offline" else "offline"
    kwargs = dict(project=cfg.get("project", "dpq"), entity=cfg.get("entity"), name=run_name, save_dir=save_dir,
                  tags=list(cfg.get("tags") or []), group=cfg.get("group"), config=config)
    settings = wandb.Settings(init_timeout=float(cfg.get("init_timeout", 60)), silent=True)
    try:
        logger = WandbLogger(offline=mode == "offline", mode=mode, settings=settings, **kwargs)
        _ = logger.experiment  # start the run now, so a failure shows here and not mid-training
        log.info("wandb: %s run in %s", mode, save_dir)
        return logger
    except Exception as e:
        if mode == "offline":
            log.warning("wandb could not start (%s); continuing without a tracker", e)
            return None
        log.warning("wandb online failed (%s); logging offline instead (sync later with `wandb sync`)", e)
        try:
            logger = WandbLogger(offline=True, mode="offline", settings=settings, **kwargs)
            _ = logger.experiment
            return logger
        except Exception as e2:
            log.warning("wandb offline failed too (%s); continuing without a tracker", e2)
            return None


def finish(logger, summary: dict | None = None) -> None:
    """Close the tracker; W&B gets the final metrics in its run summary."""
    if logger is None:
        return
    try:
        from lightning.pytorch.loggers import WandbLogger

        if isinstance(logger, WandbLogger):
            if summary:
                logger.experiment.summary.update(summary)
            logger.experiment.finish()
        else:
            logger.finalize("success")
    except Exception as e:  # the tracker must never fail the run
        log.warning("logger finish failed: %s", e)
