"""Experiment loggers chosen by ``logger=``: wandb (default), csv, tensorboard, none.

W&B runs online only when credentials are present; otherwise, or when the service cannot
be reached, it logs offline into the run folder (``wandb sync`` uploads it later);
``WANDB_MODE=offline`` (or ``dryrun``) forces offline and ``WANDB_MODE=disabled`` means no
tracker at all (with ``logger.mode=auto``). Under a W&B sweep the run's config is logged as
dotted keys (:func:`wandb_config`). A
tracker failure never fails training: every call a run makes to its tracker goes through
:func:`tolerant` (one warning, then the tracker is left alone), and results.json is written
locally regardless.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import netrc
import os
from pathlib import Path

log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    """Lines a run would print that no user can act on, most of them once per stage."""
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    # Every stage builds a Trainer; its per-fit banners ("GPU available", tips) would repeat five times.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
    # torchao warns on import that Triton is missing; its Triton kernels are CUDA-only, so without a GPU
    # nothing is lost (with one, the warning stays: it may matter there).
    if not torch.cuda.is_available():
        logging.getLogger("torchao.kernel.intmm").setLevel(logging.ERROR)
    # transformers' progress bars at every model load and save ("Loading weights", "Writing model shards"):
    # a run loads and saves small models at every stage. Downloads keep theirs (huggingface_hub's).
    hf_logging.disable_progress_bar()
    # Lightning's own use of a torch API that torch deprecated: nothing a user can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


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


def env_wandb_mode() -> str | None:
    """``WANDB_MODE`` as W&B reads it: ``online`` (``run``), ``offline`` (``dryrun``, its older name, which
    Lightning's WandbLogger sets in-process for an offline run), ``disabled``; None when unset or unknown."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    modes = {
        "online": "online",
        "run": "online",
        "offline": "offline",
        "dryrun": "offline",
        "disabled": "disabled",
    }
    return modes.get(env)


def under_wandb_sweep() -> bool:
    """A ``wandb agent`` started this process (it sets the sweep's id and parameter file in the environment)."""
    return bool(os.environ.get("WANDB_SWEEP_ID") or os.environ.get("WANDB_SWEEP_PARAM_PATH"))


def flat_config(config: dict, prefix: str = "") -> dict:
    """``config`` with its nested mappings as dotted keys (``pipeline.stages.prune.final_sparsity``).

    A mapping whose own keys contain a dot (a layer selector under ``overrides``) or that is empty stays one
    value, so that every dotted key splits back into the path it came from and no setting disappears."""
    out: dict = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(c, str) and "." not in c for c in v):
            out.update(flat_config(v, f"{key}."))
        else:
            out[key] = v
    return out


def wandb_config(config: dict | None) -> dict | None:
    """What ``wandb.init`` gets as the run's config: ``config`` (the resolved run config) as it is, nested,
    except under a W&B sweep, where it is flattened to dotted keys.

    W&B merges a sweep's parameters into the config shallowly, top-level key by key, and locks them: a swept
    ``pipeline: dp`` (a preset name) would replace the whole resolved ``pipeline`` block (every stage's
    settings, the bit widths) and a swept ``pipeline.stages.prune.final_sparsity`` would sit beside the
    nested block as a duplicate. Flattened, the resolved config collides with nothing it should not: a swept
    dotted key is the very key the resolved config logs (same value), and the preset name ``pipeline`` sits
    beside ``pipeline.name``, ``pipeline.order``, ``pipeline.stages.*``. W&B's dashboards show a nested
    config as dotted columns anyway, so a sweep's runs filter and group by the same column names
    (``pipeline.stages.prune.final_sparsity``) as the nested config of a run outside a sweep, whose config
    stays as it was. (Moving a colliding block under another key instead would give sweep runs columns of
    their own, ``resolved.pipeline...``, that no other run has.) ``dpq.pareto`` reads all three forms.
    """
    if config is None or not under_wandb_sweep():
        return config
    return flat_config(config)


def _wandb_logger(cfg: dict, save_dir: str, run_name: str, config: dict | None):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    mode = cfg.get("mode", "auto")
    if mode == "auto":
        # An explicit mode is passed to wandb.init, where it overrides WANDB_MODE: so auto reads it here.
        # disabled: no tracker at all (as logger=none) rather than W&B's disabled mode, whose stand-in run
        # would still be handed tables, plots and results.json uploads that go nowhere.
        env = env_wandb_mode()
        if env == "disabled":
            log.info("wandb: WANDB_MODE=disabled; running without a tracker")
            return None
        mode = "online" if wandb_credentials() and env != "offline" else "offline"
    kwargs = dict(
        project=cfg.get("project", "dpq"),
        entity=cfg.get("entity"),
        name=run_name,
        save_dir=save_dir,
        tags=list(cfg.get("tags") or []),
        group=cfg.get("group"),
        config=wandb_config(config),
    )
    settings = wandb.Settings(init_timeout=float(cfg.get("init_timeout", 60)), silent=True)
    with _wandb_mode_kept():
        return _start_wandb(WandbLogger, mode, settings, kwargs)


@contextlib.contextmanager
def _wandb_mode_kept():
    """Restore ``WANDB_MODE`` once the run has started: Lightning's offline ``WandbLogger`` sets it to
    ``dryrun`` for the whole process, which every later run of a multirun would read as the user's choice
    (``logger.mode=auto`` offline for good after one offline job or one transient online failure)."""
    before = os.environ.get("WANDB_MODE")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = before


def _start_wandb(WandbLogger, mode: str, settings, kwargs: dict):
    try:
        logger = WandbLogger(offline=mode == "offline", mode=mode, settings=settings, **kwargs)
        _ = logger.experiment  # start the run now, so a failure shows here and not mid-training
        log.info("wandb: %s run in %s", mode, kwargs["save_dir"])
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


@functools.cache
def _tolerant_logger_class():
    from lightning.pytorch.loggers.logger import Logger

    class TolerantLogger(Logger):
        """What every stage's Trainer logs through: the tracker's calls, with its failures contained.

        Lightning lets a logger's exception end ``fit``; a tracker that crashes mid-run (network
        gone, expired key, a backend bug) must not. The first failure is logged once and the
        tracker is left alone for the rest of the run; results.json and checkpoints are local.
        """

        def __init__(self, inner):
            super().__init__()
            self.inner, self.failed, self.closed = inner, False, False

        def _call(self, method: str, *args, **kwargs):
            if self.failed:
                return None
            try:
                return getattr(self.inner, method)(*args, **kwargs)
            except Exception as e:
                self.failed = True
                log.warning(
                    "tracker %s failed in %s (%s: %s); the run continues without it (results.json and "
                    "checkpoints are written locally)",
                    type(self.inner).__name__,
                    method,
                    type(e).__name__,
                    e,
                )
                return None

        @property
        def name(self):
            return self.inner.name

        @property
        def version(self):
            return self.inner.version

        @property
        def save_dir(self):
            return self.inner.save_dir

        @property
        def log_dir(self):
            return getattr(self.inner, "log_dir", None)

        @property
        def root_dir(self):
            return getattr(self.inner, "root_dir", None)

        @property
        def experiment(self):
            return self.inner.experiment

        def log_metrics(self, metrics, step=None):
            return self._call("log_metrics", metrics, step)

        def log_hyperparams(self, params, *args, **kwargs):
            return self._call("log_hyperparams", params, *args, **kwargs)

        def log_graph(self, model, input_array=None):
            return self._call("log_graph", model, input_array)

        def save(self):
            return self._call("save")

        def finalize(self, status):
            return self._call("finalize", status)

        def after_save_checkpoint(self, checkpoint_callback):
            return self._call("after_save_checkpoint", checkpoint_callback)

        def guard(self, what: str, fn, *args, **kwargs):
            """``fn(*args, **kwargs)`` for something that talks to the tracker; a failure is one warning.
            Skipped once the tracker has failed (left alone, as every logging call then is)."""
            if self.failed:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                log.warning(
                    "%s failed (%s: %s); the run's local results are unaffected", what, type(e).__name__, e
                )
                return None

        def close(self, summary: dict | None = None) -> None:
            """End the tracker's run; W&B gets the final metrics in its run summary.

            After a tracker failure the run is still ended (a W&B run left open would be the one the next
            run of a multirun logs into), marked failed (exit code 1) and without the summary."""
            from lightning.pytorch.loggers import WandbLogger

            if self.closed:
                return
            failed, self.failed, self.closed = self.failed, False, True

            def close_inner() -> None:
                if isinstance(self.inner, WandbLogger):
                    if summary and not failed:
                        self.inner.experiment.summary.update(summary)
                    self.inner.experiment.finish(exit_code=1 if failed else None)
                else:
                    self.inner.finalize("failed" if failed else "success")

            self.guard("logger finish", close_inner)
            self.failed = True  # ended: nothing more goes to it

    return TolerantLogger


def tolerant(logger):
    """``logger`` wrapped so that its failures never end training (None stays None)."""
    return None if logger is None else _tolerant_logger_class()(logger)
