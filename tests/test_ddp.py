"""Scale-out with Lightning's DDP: the trainer configs build DDP strategies, and a real
2-process run on CPU (gloo) ends with the same masks and quantized weights on both ranks.

Run as a script (``python tests/test_ddp.py OUT_DIR override...``) this file is one rank of
that run: Lightning's ``ddp`` launcher re-runs the same command for rank 1, each rank runs
the whole pipeline and writes what it holds in memory to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _digest(t) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _rank_main(out: Path, overrides: list[str]) -> None:
    """One rank: run the pipeline, then dump masks, quantized state and the examples it trained on."""
    sys.path.insert(0, str(HERE))
    from conftest import compose_cfg

    from dpq.distill.module import ClassifierModule
    from dpq.quant import QuantizedLinear
    from dpq.run import RunContext, Runner
    from dpq.train import train

    seen: dict[str, set[int]] = {}
    holder: dict = {}
    real_run, real_step, real_trainer = Runner.run, ClassifierModule.training_step, RunContext.make_trainer

    def run(self, stages):
        holder["runner"] = self
        return real_run(self, stages)

    def training_step(self, batch, batch_idx):
        if self.current_epoch == 0:  # DistributedSampler reshuffles (and re-shards) every epoch
            seen.setdefault(self.stage, set()).update(int(i) for i in batch["idx"])
        return real_step(self, batch, batch_idx)

    def make_trainer(self, *a, **k):
        holder["trainer"] = real_trainer(self, *a, **k)
        return holder["trainer"]

    Runner.run, ClassifierModule.training_step, RunContext.make_trainer = run, training_step, make_trainer
    cfg = compose_cfg(
        out, [o for o in overrides if not o.startswith("hydra.")]
    )  # one run folder, as under Hydra
    results = train(cfg)
    state, trainer = holder["runner"].state, holder["trainer"]
    quantized = {}
    for name, mod in state.student.named_modules():
        if isinstance(mod, QuantizedLinear):
            quantized[name] = {k: _digest(v) for k, v in mod.state_dict().items()}
    dump = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "pid": os.getpid(),
        "masks": {n: _digest(m) for n, m in sorted(state.masks.items())},
        "mask_kept": {n: int(m.sum()) for n, m in sorted(state.masks.items())},
        "mask_size": {n: m.numel() for n, m in sorted(state.masks.items())},
        "quantized": quantized,
        "zeros_match_masks": all(
            bool((_weight(state.student, n) == 0)[~m].all()) for n, m in state.masks.items()
        ),
        "seen": {k: sorted(v) for k, v in seen.items()},
        "final_sparsity": results["final"]["sparsity"],
    }
    tmp = out / f".rank{trainer.global_rank}.json.tmp"
    tmp.write_text(json.dumps(dump))
    tmp.replace(out / f"rank{trainer.global_rank}.json")


def _weight(model, name):
    from dpq.quant import QuantizedLinear

    mod = model.get_submodule(name)
    return mod.dequantize() if isinstance(mod, QuantizedLinear) else mod.weight


# ---- fast: the configs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, ranks, batch, want",
    [
        (
            65,
            2,
            32,
            {0: [32, 1], 1: [32, 0]},
        ),  # rank 1's last position repeats example 0: a batch of repeats only
        (65, 2, 128, {0: [33], 1: [32]}),
        (10, 4, 2, {0: [2, 1], 1: [2, 1], 2: [2, 0], 3: [2, 0]}),  # 12 positions, two repeats
        (64, 2, 32, {0: None, 1: None}),  # nothing padded
    ],
)
def test_the_fit_time_validation_scores_each_example_once(n, ranks, batch, want):
    """Lightning's DistributedSampler pads validation to a multiple of the ranks with repeats of the first
    examples; ClassifierModule.padding_mask marks them so the synced metrics leave them out, while every
    rank keeps its batch count (DDP's forward syncs buffers). The kept positions cover the split once."""
    from types import SimpleNamespace

    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from dpq.distill.module import ClassifierModule

    covered = []
    for rank in range(ranks):
        sampler = DistributedSampler(list(range(n)), num_replicas=ranks, rank=rank, shuffle=False)
        loader = DataLoader(list(range(n)), sampler=sampler, batch_size=batch)
        module = ClassifierModule(torch.nn.Linear(2, 2), 2, "distill")
        module._trainer = SimpleNamespace(val_dataloaders=loader)
        module.on_validation_epoch_start()
        got = []
        for b in loader:
            keep = module.padding_mask(len(b))
            got.append(None if keep is None else int(keep.sum()))
            covered += b.tolist() if keep is None else b[keep].tolist()
        assert got == ([None] * len(got) if want[rank] is None else want[rank]), rank
    assert sorted(covered) == list(range(n))


@pytest.mark.parametrize("name, backend, devices", [("ddp_cpu", "gloo", 2), ("ddp", "nccl", "auto")])
def test_ddp_trainer_configs_build_a_ddp_strategy(make_cfg, name, backend, devices):
    import hydra
    from lightning.pytorch.strategies import DDPStrategy

    cfg = make_cfg("experiment=digits", f"trainer={name}")
    assert cfg.trainer.devices == devices
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DDPStrategy) and strategy._process_group_backend == backend
    if name == "ddp_cpu":  # builds (does not launch: launching happens at fit)
        trainer = hydra.utils.instantiate(cfg.trainer, max_epochs=1, logger=False)
        assert trainer.world_size == 2 and isinstance(trainer.strategy, DDPStrategy)


@pytest.mark.parametrize("rank, said", [(None, True), ("0", True), ("1", False)])
def test_the_config_checks_warnings_are_said_by_rank_zero_only(tmp_path, monkeypatch, caplog, rank, said):
    """Lightning's launcher starts rank 1 with the run's own command: it makes every config and data check
    again, and said each warning a second time. Rank 1 still fails on an error (below)."""
    sys.path.insert(0, str(HERE))
    from conftest import compose_cfg
    from omegaconf import open_dict

    from dpq.core.errors import ConfigError
    from dpq.train import train

    for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    if rank is not None:
        monkeypatch.setenv("LOCAL_RANK", rank)
    warns = ["pipeline=dq", "pipeline.stages.quantize.bits=8"]  # validate: 8-bit weight-only export warning
    c = compose_cfg(tmp_path, ["experiment=tiny", *warns, "dry_run=true"])
    with open_dict(c):
        c.paths.output_dir = str(tmp_path / "dry")
    with caplog.at_level("INFO"):
        train(c)
    assert any("weight-only codes export" in r.getMessage() for r in caplog.records) == said
    assert logging.getLogger("dpq").level == logging.NOTSET  # restored after the checks
    with pytest.raises(ConfigError, match="trainer.limit_val_batches=0"):
        train(
            compose_cfg(tmp_path, ["experiment=tiny", *warns, "dry_run=true", "trainer.limit_val_batches=0"])
        )


# ---- slow: a real 2-process run ---------------------------------------------------------------

DDP_RUN = [
    "experiment=digits",
    "trainer=ddp_cpu",
    "pipeline=dpq",
    "pipeline.stages.prune.criterion=movement",
    "pipeline.stages.prune.update_every=2",
    "+trainer.limit_train_batches=6",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "cost.repeats=1",
    "cost.warmup=0",
    "logger=none",
]


def _env() -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    for k in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "DPQ_STAGE_CACHE_PLAN",
    ):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_two_process_ddp_on_cpu_ends_with_identical_masks_and_quantized_weights(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path), *DDP_RUN],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = [tmp_path / "rank0.json", tmp_path / "rank1.json"]
    deadline = time.monotonic() + 120  # rank 1 is a child that may finish just after rank 0 exits
    while not all(f.exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all(f.exists() for f in files), proc.stderr[-4000:]
    r0, r1 = (json.loads(f.read_text()) for f in files)
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world_size"] == r1["world_size"] == 2
    assert r0["pid"] != r1["pid"]
    # The ranks trained on different examples in each epoch (DistributedSampler shards) ...
    for stage in ("teacher", "distill", "prune", "recover", "quantize"):
        assert r0["seen"][stage] and r1["seen"][stage], stage
        assert not set(r0["seen"][stage]) & set(r1["seen"][stage]), stage
    # ... yet hold the same masks (movement scores use the all-reduced gradients) and quantized state.
    assert r0["masks"] and r0["masks"] == r1["masks"]
    assert r0["mask_kept"] == r1["mask_kept"]
    assert r0["quantized"] and r0["quantized"] == r1["quantized"]
    assert r0["zeros_match_masks"] and r1["zeros_match_masks"]
    kept, size = sum(r0["mask_kept"].values()), sum(r0["mask_size"].values())
    assert 1 - kept / size == pytest.approx(0.5, abs=1e-3)  # the prune target, held through QAT
    assert r0["final_sparsity"] >= 0.5 - 1e-3  # 4-bit rounding may add zeros, never remove pruned ones


def _train_cli(tmp_path: Path, *overrides: str, run: str = "run") -> dict:
    """``python -m dpq.train <overrides>`` into ``tmp_path/<run>`` (caches beside it); its results.json."""
    proc = subprocess.run(
        [sys.executable, "-m", "dpq.train", *overrides]
        + [f"hydra.run.dir={tmp_path / run}", f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / run / "results.json").read_text())


@pytest.mark.slow
def test_the_ddp_command_line_run_completes_in_one_run_folder(tmp_path):
    """``python -m dpq.train trainer=ddp_cpu``: Lightning re-runs the command for rank 1 in the same folder."""
    results = _train_cli(tmp_path, *DDP_RUN)
    assert results["status"] == "completed" and results["order"][-1] == "quantize"
    assert results["stages"][2]["metrics"]["sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.slow
def test_under_ddp_the_recorded_accuracy_is_the_whole_splits(tmp_path):
    """65 test examples on 2 ranks: a DistributedSampler pads the shards to 33 + 33 with a repeated example;
    the recorded accuracy must still be the split's (what the per-example predictions give), not 66 examples'."""
    # validation and test: 65 examples each
    results = _train_cli(tmp_path, "experiment=tiny", "trainer.devices=2", "task.subsample=260", "logger=csv")
    assert results["predictions"]["test_n"] == results["predictions"]["val_n"] == 65
    assert results["predictions"]["matches"], results["predictions"]
    for stage in results["stages"]:
        for key in ("accuracy", "val_accuracy"):
            assert stage["metrics"][key] * 65 == pytest.approx(round(stage["metrics"][key] * 65), abs=1e-4)
    # The validation curve logged during fit is the split's too: its last point, on the weights the stage ended
    # with, is what the evaluation recorded (it read 25/66 with the padded repeat, and Lightning's synced mean
    # divided the loss by an integer mean batch count once the repeat was left out).
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    for stage in results["stages"][:2]:  # teacher and distill end where they were evaluated
        name = stage["stage"]
        fit = [r for r in rows if r.get(f"{name}/val_acc") and int(r["step"]) > 0]
        assert fit, name
        assert float(fit[-1][f"{name}/val_acc"]) == pytest.approx(stage["metrics"]["val_accuracy"], abs=1e-7)
        assert float(fit[-1][f"{name}/val_loss"]) == pytest.approx(stage["metrics"]["val_loss"], abs=1e-5)


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), sys.argv[2:])


def test_the_threads_a_ddp_run_keys_its_stages_with_are_the_threads_it_trains_with(monkeypatch):
    """Lightning's DDP launcher sets cpu_count // processes threads when it starts the ranks, after the
    stage-cache keys were computed with the process's threads: every entry carried the wrong count and the
    next run refused it (stage cache never reused under DDP). settle_threads sets them first."""
    import torch
    from lightning.fabric.utilities.distributed import _suggested_max_num_threads

    from dpq.core.distributed import settle_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        settle_threads({"accelerator": "cpu", "devices": 1})  # one process: nothing to settle
        assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in os.environ
        settle_threads({"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
        assert torch.get_num_threads() == _suggested_max_num_threads(2)
        assert os.environ["OMP_NUM_THREADS"] == str(_suggested_max_num_threads(2))
    finally:
        torch.set_num_threads(before)


def test_a_dry_run_plans_the_stage_cache_keys_of_the_ddp_run_and_leaves_the_threads(tmp_path, monkeypatch):
    """The dry run returned before settle_threads: its keys carried the process's threads, the DDP run's
    the launcher's, so its plan could never say "from the cache". It must not keep them set either."""
    import torch
    from lightning.fabric.utilities.distributed import _suggested_max_num_threads

    sys.path.insert(0, str(HERE))
    from conftest import compose_cfg

    from dpq.run import stage_cache
    from dpq.train import train

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before, seen, keys = torch.get_num_threads(), [], stage_cache.pipeline_keys

    def spy(cfg, extra=None):
        seen.append(torch.get_num_threads())
        return keys(cfg, extra)

    monkeypatch.setattr(stage_cache, "pipeline_keys", spy)
    train(compose_cfg(tmp_path, ["experiment=digits", "trainer=ddp_cpu", "pipeline=dense", "dry_run=true"]))
    assert seen and set(seen) == {_suggested_max_num_threads(2)}
    assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in os.environ


@pytest.mark.slow
def test_a_second_ddp_run_is_served_its_stages_from_the_cache(tmp_path):
    """Two DDP runs of one configuration: the second restores both stages the first published."""
    runs = [_train_cli(tmp_path, *DDP_RUN[:2], "pipeline=dense", *DDP_RUN[4:], run=r) for r in ("a", "b")]
    assert [bool(s.get("cached")) for s in runs[0]["stages"]] == [False, False]
    assert [bool(s.get("cached")) for s in runs[1]["stages"]] == [True, True]
