"""Several processes of one run (DDP): which rank writes, waiting for all, and one decision for all.

Known before Lightning launches the other ranks, from the launcher's environment, so the
stage loop can plan (which cached stages to skip) identically on every rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from dpq.core.errors import ConfigError

log = logging.getLogger(__name__)


def is_global_zero() -> bool:
    """Rank 0 of a DDP run (or a single process): the one that writes snapshots and claims the folder.

    Lightning sets the rank from the launcher's environment at import and again when the strategy
    starts; every rank runs the same stages and holds the same weights.
    """
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def barrier() -> None:
    """Wait for every rank of a DDP run (a single process does not wait)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def trainer_world_size(trainer: Mapping[str, Any]) -> int:
    """Processes a run's ``trainer`` config will train with (devices x num_nodes).

    Known before Lightning launches the other ranks, when the environment still says 1.
    """
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1) or 1
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError("trainer.num_nodes", nodes, "must be an integer >= 1")
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif str(devices) in ("auto", "-1"):
        n = 1
        if str(trainer.get("accelerator", "auto")) in ("gpu", "cuda", "auto"):
            import torch

            n = max(1, torch.cuda.device_count())
    elif isinstance(devices, str) and "," in devices:  # Lightning's "0,1" / "1,": these device indices
        n = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, int) and not isinstance(devices, bool):
        n = devices
    elif isinstance(devices, str) and devices.strip().isdigit():
        n = int(devices)
    else:  # 'abc' was a raw ValueError
        raise ConfigError(
            "trainer.devices", devices, "must be a device count, a list of device indices, '0,1', -1 or auto"
        )
    return max(1, n) * nodes


def settle_threads(trainer: Mapping[str, Any]) -> None:
    """Set now the CPU threads Lightning's DDP launcher will set when it starts the other ranks
    (``cpu_count // processes per node``, unless ``OMP_NUM_THREADS`` is set): the stage-cache keys, which
    cover the thread count (it changes float sums), are computed before that launch, and keyed with the
    threads of a process that then trained with fewer, every entry was refused by the next run."""
    world = trainer_world_size(trainer)
    if world > 1:
        # Lightning's own (private) policy, so the numbers are exactly the launcher's
        from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

        _set_num_threads_if_needed(num_processes=world // max(1, int(trainer.get("num_nodes", 1) or 1)))


@contextlib.contextmanager
def threads_settled(trainer: Mapping[str, Any]) -> Iterator[None]:
    """:func:`settle_threads` for a while, then the process's threads (and ``OMP_NUM_THREADS``) as before:
    a dry run plans the stage-cache keys the run would compute, and leaves the process as it found it."""
    import torch

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        settle_threads(trainer)
        yield
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


T = TypeVar("T")
PLAN_ENV = "DPQ_STAGE_CACHE_PLAN"
_IMPORTED_AT = time.time()  # ~ this process's start: a plan file older than that is from an earlier launch
CLOCK_SLACK_S = 60.0  # ranks on several nodes: clocks may differ a little


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from the launcher's environment, before any process group exists.

    The rank is the global one where the launcher sets it (torchrun ``RANK``, srun
    ``SLURM_PROCID``); under Lightning's own launcher it is 0 exactly for local rank 0 on
    node 0 (other values only say "not rank 0").
    """
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
    env = os.environ
    if env.get("RANK") not in (None, ""):
        return int(env["RANK"]), world
    # Lightning's launcher sets LOCAL_RANK and NODE_RANK for the ranks it starts; inside an interactive
    # SLURM allocation it starts them itself and they inherit SLURM_PROCID=0 from the first, so a
    # process is rank 0 only where both say 0 (else each such rank took itself for rank 0).
    local = None
    if env.get("LOCAL_RANK") not in (None, ""):
        local = int(env["LOCAL_RANK"]) + int(env.get("NODE_RANK") or 0)
    if env.get("SLURM_PROCID") not in (None, "") and not local:
        return int(env["SLURM_PROCID"]), world
    return local or 0, world


@contextlib.contextmanager
def warnings_on_rank_zero(logger: str = "dpq") -> Iterator[None]:
    """Within: ``logger``'s warnings are said by rank 0 only (errors by every rank). Lightning's DDP launcher
    starts each other rank with the run's own command, so every rank makes the config and data checks again,
    and each said their warnings (one line per process for one config)."""
    if process_rank()[0] == 0:
        yield
        return
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _launch_id() -> str | None:
    """A name every process of one launch shares, for launchers that start all ranks at once."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    if run_id == "none" and os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):
        # Plain one-node torchrun names no run: its ranks share their parent, the agent, which a relaunch
        # of the same command does not (the address and port alone let a rank follow the plan of the
        # launch before, written within the clock slack).
        return f"torchrun-agent-{os.getppid()}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_STEP_ID', '0')}"
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return f"addr-{os.environ['MASTER_ADDR']}-{os.environ['MASTER_PORT']}"
    return None


def rank_zero_decides(
    topic: str, decide: Callable[[], T], root: str | os.PathLike, timeout_s: float = 600.0
) -> T:
    """The value rank 0's ``decide()`` returned, on every rank (JSON-serialisable values).

    In a DDP run every rank must skip the same cached stages, or the collectives of the stages
    one rank trains would wait forever for a rank that skipped them; each rank looking the
    cache up itself is not enough (another trial may complete an entry between two looks).
    Rank 0 decides. Ranks that Lightning's ``ddp`` launcher starts later inherit the decision
    through the environment (:data:`PLAN_ENV`, set before the first ``Trainer`` call);
    ranks started together (torchrun, srun) read it from ``<root>/.plans/<launch id>.json``.
    ``topic`` names what is decided (e.g. the run's key list): a plan for another topic is
    never used.
    """
    rank, world = process_rank()
    if rank == 0:
        value = decide()
        plan = json.dumps({"topic": topic, "value": value, "pid": os.getpid(), "time": time.time()})
        os.environ[PLAN_ENV] = plan
        launch = _launch_id()
        if world > 1 and launch is not None:
            plans = Path(root) / ".plans"
            plans.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=plans, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                f.write(plan)
            os.replace(tmp, plans / f"{launch}.json")
        return value
    # Only a plan written by the process that started this one (Lightning's launcher is rank 0).
    inherited = _read_plan(os.environ.get(PLAN_ENV), topic, writer_pid=os.getppid())
    if inherited is not None:
        return inherited[0]
    launch = _launch_id()
    if launch is not None:
        path = Path(root) / ".plans" / f"{launch}.json"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = _read_plan(
                path.read_text() if path.exists() else None, topic, not_before=_IMPORTED_AT - CLOCK_SLACK_S
            )
            if found is not None:
                return found[0]
            time.sleep(0.2)
    log.warning("stage cache: rank %d found no plan from rank 0 for this run; deciding on its own", rank)
    return decide()


def _read_plan(
    text: str | None, topic: str, writer_pid: int | None = None, not_before: float | None = None
) -> tuple[Any] | None:
    if not text:
        return None
    try:
        plan = json.loads(text)
    except json.JSONDecodeError:
        return None
    if plan.get("topic") != topic or (writer_pid is not None and plan.get("pid") != writer_pid):
        return None
    if not_before is not None and float(plan.get("time", 0)) < not_before:
        return None  # e.g. a requeued SLURM job (same job id) reading its previous launch's plan
    return (plan["value"],)
