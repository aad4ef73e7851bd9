"""Continue a killed run where it stopped, with the same result as if it had never stopped.

Two levels of state:

* between stages, :mod:`dpq.run.snapshot` folders (``<run>/checkpoints/stage_<i>_<name>/``);
* within a stage, every Lightning fit writes a checkpoint every ``checkpoint.every_n_steps``
  optimizer steps into ``stage_<i>_<name>/lightning/<fit>/`` (:class:`StageCheckpoint`,
  written atomically by :class:`AtomicCheckpointIO`); on resume that fit calls
  ``trainer.fit(..., ckpt_path=<newest readable>)`` so Lightning restores the weights,
  optimizer, LR schedule, loop counters (global step) and every callback's state (masks,
  the sparsity ramp's scores and history, the quantizer's state) by ``state_key``.

What Lightning does not restore, :class:`ResumeState` carries in the same checkpoint: the
global RNG streams (dropout), the data position, and the teacher's logit cache. Lightning
2.6 restarts a mid-epoch resume at the beginning of a *new* sampler pass, and drops a
stateful loader's state when ``configure_optimizers`` reads ``estimated_stepping_batches``
(Lightning issue #20550, which dpq's module does) -- so the data order is made a pure
function of (seed, epoch) by :class:`ResumableSampler`, which skips the batches already seen.

The entry point: ``python -m dpq.train resume=<run folder>`` reloads the resolved config the
run saved when it started (``checkpoints/run.json``) and continues in the same folder.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from torch.utils.data import BatchSampler, DataLoader, Sampler

from dpq.core.distributed import is_global_zero
from dpq.core.errors import ConfigError
from dpq.core.files import write_file_atomic, write_json_atomic
from dpq.core.provenance import code_fingerprint
from dpq.data import recorded_task
from dpq.distill.teachers import cache_state, load_cache_state, teacher_caches
from dpq.run.snapshot import safe_name

log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # <run>/checkpoints/run.json: the resolved config the run started with
CHECKPOINTS = "checkpoints"
LIGHTNING = "lightning"


# ---- mid-stage Lightning checkpoints ---------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the checkpoint's own folder, fsync, rename.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the
    system temp dir; across file systems its final move is a copy, so a kill can leave a
    truncated checkpoint. A same-folder rename cannot.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        write_file_atomic(Path(path), lambda p: torch.save(checkpoint, p))


class StageCheckpoint(ModelCheckpoint):
    """Every ``every_n_steps`` optimizer steps, keep the newest ``keep`` checkpoints of one fit.

    Skipped: the fit's final step (the stage snapshot follows right after, and a checkpoint at
    ``max_steps`` would resume into a loop that never calls the end-of-training hooks) and any
    step whose weights hold NaN/Inf (the last good checkpoint is kept instead).
    """

    def __init__(self, dirpath: Path, every_n_steps: int, keep: int = 2):
        super().__init__(
            dirpath=str(dirpath),
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=int(every_n_steps),
            save_top_k=int(keep),
            monitor="step",
            mode="max",
            save_last=False,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )

    def _should_skip_saving_checkpoint(self, trainer) -> bool:
        if super()._should_skip_saving_checkpoint(trainer):
            return True
        if trainer.global_step >= trainer.estimated_stepping_batches:
            return True
        pending = [
            cb
            for cb in trainer.callbacks
            if callable(getattr(cb, "pending_state", None)) and cb.pending_state()
        ]
        if pending:  # e.g. an OBS ramp between two mask updates: its gradients are not in any checkpoint
            log.info(
                "step %d: %s holds state a checkpoint cannot (gradients for its next mask update); "
                "not checkpointing this step",
                trainer.global_step,
                getattr(pending[0], "state_key", type(pending[0]).__name__),
            )
            return True
        bad = [n for n, p in trainer.lightning_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            log.warning(
                "step %d: NaN/Inf in %s; not checkpointing (the previous checkpoint stays the last good one)",
                trainer.global_step,
                bad[0],
            )
            return True
        return False


def fit_dir(stage_dir: Path, fit_name: str) -> Path:
    """``<stage snapshot dir>/lightning/<fit>``: where one fit of a stage writes its checkpoints."""
    return Path(stage_dir) / LIGHTNING / safe_name(fit_name)


def _step_of(path: Path) -> int:
    m = re.search(r"step(\d+)", path.name)
    return int(m.group(1)) if m else -1


def newest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint in ``directory`` that ``torch.load`` reads; unreadable ones are renamed
    ``*.corrupt`` with a warning and the previous one is used."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for path in sorted(
        directory.glob("*.ckpt"), key=lambda p: (_step_of(p), p.stat().st_mtime), reverse=True
    ):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            if "state_dict" not in ckpt or "loops" not in ckpt:
                raise ValueError("not a Lightning training checkpoint")
            return path
        except Exception as e:  # a truncated zip, a bad pickle, a foreign file: all mean "do not use"
            bad = path.with_name(path.name + ".corrupt")
            log.warning(
                "checkpoint %s is unreadable (%s: %s); renamed to %s, trying the previous one",
                path,
                type(e).__name__,
                str(e).splitlines()[0][:200] if str(e) else "",
                bad.name,
            )
            try:
                os.replace(path, bad)
            except FileNotFoundError:  # another rank of a DDP run set it aside first
                pass
    return None


# ---- data order --------------------------------------------------------------------------------
class ResumableSampler(Sampler[int]):
    """The wrapped sampler's order for epoch ``e`` drawn from a generator seeded by (seed, e).

    A pure function of (seed, epoch) -- unlike ``RandomSampler``'s default, which draws from the
    global RNG at every pass -- so a resumed fit can rebuild the order of the interrupted epoch
    and skip the batches already trained on (:meth:`resume_at`). Works for any sampler with a
    ``generator`` attribute (``RandomSampler``, transformers' ``LengthGroupedSampler``); others
    are taken as they are.
    """

    def __init__(self, base: Sampler, seed: int):
        self.base, self.seed = base, int(seed)
        self.epoch, self._skip = 0, 0

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, skip: int) -> None:
        """The next pass is epoch ``epoch``, without its first ``skip`` indices."""
        self.epoch, self._skip = int(epoch), int(skip)

    def generator(self, epoch: int) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.seed, int(epoch)]).generate_state(1)[0])
        return torch.Generator().manual_seed(seed)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        if hasattr(self.base, "generator"):
            self.base.generator = self.generator(self.epoch)
        return itertools.islice(iter(self.base), skip, None)


def resumable_loader(loader: DataLoader, seed: int) -> tuple[DataLoader, ResumableSampler | None]:
    """The same loader (dataset, batch size, collate, workers) over a :class:`ResumableSampler`.

    A loader with a custom batch sampler is returned unchanged (``None``): its order is then
    what it is, and a mid-epoch resume of it is not exact.
    """
    if type(loader.batch_sampler) is not BatchSampler:
        return loader, None
    sampler = ResumableSampler(loader.sampler, seed)
    kw = dict(
        batch_size=loader.batch_size,
        sampler=sampler,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        drop_last=loader.drop_last,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
        # Its own generator: creating an iterator would otherwise draw a worker seed from the global RNG.
        generator=torch.Generator().manual_seed(int(seed)),
    )
    if loader.num_workers > 0:
        kw["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, **kw), sampler


# ---- the state Lightning does not keep -------------------------------------------------------------
class ResumeState(L.Callback):
    """Carries the global RNG streams, the data position and the teacher's logit cache in every checkpoint.

    Saved when a checkpoint is written (after the step's optimizer update and mask updates);
    on resume the data position and cache are put back when the checkpoint is loaded and the
    RNG streams at ``on_train_start``, after Lightning's own set-up, so dropout continues with
    exactly the numbers the uninterrupted run drew next.
    """

    def __init__(self, name: str, sampler: ResumableSampler | None, batch_size: int = 1, teacher_logits=None):
        self.name, self.sampler, self.batch_size = name, sampler, int(batch_size)
        self.caches = teacher_caches(teacher_logits)
        self._trainer = None
        self._rng: dict | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        from lightning.fabric.utilities.seed import _collect_rng_states

        out: dict[str, Any] = {"rng": _collect_rng_states(), "teacher_logits": cache_state(self.caches)}
        t = self._trainer
        if self.sampler is not None and t is not None:
            done, epoch = int(t.fit_loop.epoch_loop.batch_progress.current.processed), int(t.current_epoch)
            if (
                done >= t.num_training_batches
            ):  # saved on the epoch's last batch: the next pass is a new epoch
                epoch, done = epoch + 1, 0
            out["data"] = {"seed": self.sampler.seed, "epoch": epoch, "batches_done": done}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")
        if self.caches and state_dict.get("teacher_logits"):
            load_cache_state(self.caches, state_dict["teacher_logits"])
        data = state_dict.get("data")
        if data is not None and self.sampler is not None:
            self.sampler.seed = int(data["seed"])
            self.sampler.resume_at(int(data["epoch"]), int(data["batches_done"]) * self.batch_size)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._rng is not None:
            from lightning.fabric.utilities.seed import _set_rng_states

            _set_rng_states(self._rng)
            self._rng = None


# ---- the run folder ---------------------------------------------------------------------------------
def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def check_same_data(folder, splits) -> None:
    """A resumed run must read the examples it started on: a data file edited or a hub dataset updated
    between the kill and the resume would train and measure its later stages (and look up the teacher's
    cached logits by example index) on other examples, and results.json would not say so. Runs started
    before run.json recorded the data are not checked."""
    # load_run_config read run.json a moment ago; a file going away now is not this check's business
    if differs := splits.changed_since(run_record(folder).get("data")):
        raise ConfigError(
            "resume",
            str(folder),
            f"the task's examples are not the ones the run started on ({differs}): its later stages would "
            "train and be measured on other data than its earlier ones; restore the data the run started with "
            "(a file edited in place, a hub dataset's newer revision), or start a new run",
        )


def run_record(folder) -> dict:
    """What ``checkpoints/run.json`` recorded as the run started (config, data, hub commits); {} when it
    cannot be read (:func:`load_run_config` is the check that says so)."""
    try:
        return json.loads((checkpoints_dir(Path(str(folder)).expanduser()) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def recorded_hub_commits(folder) -> dict[str, str]:
    """The hub models' commits a run started with (run.json; none for runs started before it recorded them)."""
    return run_record(folder).get("hub_commits") or {}


def claim_output_dir(
    output_dir: Path, cfg_dict: dict, data: dict | None = None, hub_commits: dict | None = None
) -> None:
    """Start a new run in ``output_dir``: refuse a folder that holds another run, then record the config,
    the examples it runs on (``data``: :meth:`dpq.data.TaskSplits.identity`), the commits of the hub
    models it loads (:func:`dpq.models.run_hub_commits`), which a resume loads again, and what it computes
    with (``code``: :func:`dpq.core.provenance.code_fingerprint`), which a resume's stage-cache use checks."""
    output_dir = Path(output_dir)
    if not is_global_zero():
        return  # the other ranks of a DDP run share rank 0's folder
    taken = [p for p in (output_dir / "results.json", checkpoints_dir(output_dir)) if p.exists()]
    if taken:
        raise ConfigError(
            "hydra.run.dir",
            str(output_dir),
            f"already holds another run ({', '.join(p.name for p in taken)}); a run never writes into "
            "another run's folder: continue that run with resume=<folder>, or choose a new folder",
        )
    write_json_atomic(
        checkpoints_dir(output_dir) / RUN_FILE,
        {
            "config": cfg_dict,
            **({"data": data} if data else {}),
            **({"hub_commits": hub_commits} if hub_commits else {}),
            "code": code_fingerprint(),
        },
    )


def started_elsewhere(folder) -> str | None:
    """Why a resumed run's stages may not be published to the stage cache: it started under other dpq
    source, libraries, hardware or threads (a stage resumed mid-fit would be a mix of both, keyed as
    this process's), or its run.json predates that record; None when they are this process's."""
    started = run_record(folder).get("code")
    if started is None:
        return "its run.json does not record what it started with (a run from before dpq recorded it)"
    now = json.loads(json.dumps(code_fingerprint(), default=str))
    differ = [k for k in now if started.get(k) != now[k]]
    if differ:
        return f"it started under other {', '.join(differ)} than this process has"
    return None


def check_resume_argument(argv: list[str]) -> None:
    """Refuse ``resume=<folder>`` on the command line when the folder does not exist (before Hydra makes it)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        value = value.strip("'\"")
        if key != "resume" or not sep or value in ("", "null", "None"):
            continue
        path = Path(value).expanduser()
        if not path.is_dir():  # a file (results.json) crashed in Hydra, which makes <resume>/.hydra
            raise ConfigError(
                "resume",
                value,
                ("is a file, not a run folder" if path.exists() else "no such folder")
                + "; pass the folder of the run to continue (outputs/<date>/<time>_<run name>)",
            )


def load_run_config(folder) -> dict:
    """The resolved config a run started with (``checkpoints/run.json``), pointed at ``folder``."""
    path = Path(str(folder)).expanduser()
    if not path.is_dir():
        raise ConfigError(
            "resume",
            str(folder),
            "is not a folder; pass the run folder to continue (outputs/<date>/<time>_<run name>)",
        )
    run_file = checkpoints_dir(path) / RUN_FILE
    if not run_file.exists():
        # A multirun's or study's folder holds its runs one level down; a finished run whose checkpoints
        # were removed (the committed study runs) still has its results.json.
        runs = sorted(p.parent.parent for p in path.glob(f"*/{CHECKPOINTS}/{RUN_FILE}"))
        if runs:
            hint = f"; it holds {len(runs)} run folder(s) that can be, e.g. {runs[0]}: pass one of those"
        elif (path / "results.json").exists():
            hint = "; its results.json is there: the run finished, nothing is left to resume"
        else:
            hint = ""
        raise ConfigError(
            "resume",
            str(folder),
            f"holds no dpq checkpoints ({CHECKPOINTS}/{RUN_FILE} is missing); only a run "
            f"started with checkpoint.enabled=true can be resumed{hint}",
        )
    try:
        cfg = json.loads(run_file.read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            "resume", str(folder), f"its {CHECKPOINTS}/{RUN_FILE} is unreadable ({e})"
        ) from None
    if not (cfg.get("checkpoint") or {}).get("enabled", True):
        raise ConfigError(
            "resume",
            str(folder),
            "that run was started with checkpoint.enabled=false and saved no "
            "state to resume from; start it again",
        )
    cfg["paths"]["output_dir"] = str(path.resolve())  # the folder may have been moved since
    cfg["resume"] = None
    cfg["task"] = recorded_task(cfg["task"])  # a run started before the task keys were renamed
    return cfg


def check_resume_overrides(resume, overrides: list[str]) -> None:
    """``resume=<folder>`` continues with the run's own config: any other override would silently change it."""
    if not resume:
        return
    bad = [
        o
        for o in overrides
        if o.split("=", 1)[0].lstrip("+~") != "resume"
        and not o.lstrip("+~").startswith(
            ("hydra.", "hydra/")
        )  # Hydra's own (launcher, sweeper): not the run's
    ]
    if bad:
        raise ConfigError(
            "resume",
            str(resume),
            f"continues a run with the config it started with, so no other override is "
            f"allowed (got {' '.join(bad)}); start a new run to change the config",
        )


DIRNAME_BYTES = 200  # a path component holds at most 255 bytes on common filesystems


def short_dirname(name: object) -> str:
    """A multirun job's folder name from its overrides (Hydra's ``override_dirname``), cut to
    ``DIRNAME_BYTES`` with a digest of the whole: seven ordinary stage overrides made a name over
    255 bytes, and Hydra failed to create the first job's folder ("File name too long")."""
    import hashlib

    text = str(name)
    raw = text.encode()
    if len(raw) <= DIRNAME_BYTES:
        return text
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return raw[: DIRNAME_BYTES - 14].decode(errors="ignore") + "~" + digest


def register_resolvers() -> None:
    """Resolvers ``conf/hydra/default.yaml`` uses so that ``resume=<folder>`` runs in that folder.

    ``dpq_run_dir``: the resumed folder, else a new one; ``dpq_hydra_subdir``: Hydra's record of
    a resumed invocation goes to ``.hydra/resume-<time>/``, never over the run's own ``.hydra/``.
    """
    import time

    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(  # resume='~/run' (quoted for Hydra): its ~ expanded, as the checks do
        "dpq_run_dir",
        lambda resume, new: str(Path(str(resume)).expanduser()) if resume else new,
        replace=True,
    )
    OmegaConf.register_new_resolver("dpq_dirname", short_dirname, replace=True)
    OmegaConf.register_new_resolver(
        "dpq_hydra_subdir",
        lambda resume: f".hydra/resume-{time.strftime('%Y%m%d-%H%M%S')}" if resume else ".hydra",
        replace=True,
        use_cache=True,
    )
