"""Checks between stages stop a damaged run with a clear message and keep the last good state;
the exported model must reproduce the run; a crashing tracker never fails a run."""

import json

import pytest
import torch

from dpq.core.errors import IntegrityError, TrainingDiverged
from dpq.run import integrity, snapshot
from dpq.train import train

QUICK = [
    "experiment=digits",
    "pipeline=dp",
    "trainer=debug",
    "cost.repeats=1",
    "cost.warmup=0",
    "pipeline.stages.teacher.epochs=2",
    "pipeline.stages.distill.epochs=2",
    "pipeline.stages.prune.epochs=2",
    "pipeline.stages.recover.epochs=1",
]


def test_sparsity_check_compares_same_sized_layers_only():
    before = {"a": (50, 100), "b": (10, 40)}
    integrity.check_sparsity_kept(before, {"a": (60, 100), "b": (0, 20)}, "s")  # b was shrunk: not comparable
    with pytest.raises(
        IntegrityError,
        match=r"lowered the sparsity of a from 0.5000 to 0.4900 \(1 pruned weights came back\)",
    ):
        integrity.check_sparsity_kept(before, {"a": (49, 100)}, "s")


def test_weights_turned_nan_after_a_stage_stop_the_run_and_keep_the_last_good_snapshot(
    make_cfg, tmp_path, monkeypatch
):
    from dpq.stages.prune import PruneStage

    real = PruneStage.run

    def poisoned(self, state, ctx):
        real(self, state, ctx)
        with torch.no_grad():
            state.student.get_submodule("hidden.0").weight[0, :3] = float("nan")

    monkeypatch.setattr(PruneStage, "run", poisoned)
    with pytest.raises(TrainingDiverged) as err:
        train(make_cfg(*QUICK))
    msg = str(err.value)
    assert "after stage 'prune': 3 NaN/Inf values in hidden.0.weight" in msg
    good = tmp_path / "run" / "checkpoints" / "stage_1_distill"
    assert f"the last good checkpoint is {good}" in msg
    partial = json.loads((tmp_path / "run" / "results.json").read_text())
    assert partial["status"] == "diverged" and partial["last_good_checkpoint"] == str(good)
    assert [s["stage"] for s in partial["stages"]] == ["teacher", "distill", "prune"]
    assert snapshot.read(good).stage == "distill"  # intact, and the newest complete snapshot
    assert not (tmp_path / "run" / "checkpoints" / "stage_2_prune" / snapshot.MANIFEST).exists()


def test_a_nan_loss_mid_stage_stops_before_a_nan_checkpoint_is_written(make_cfg, tmp_path, monkeypatch):
    import dpq.distill.module

    real = dpq.distill.module.kd_loss
    calls = {"n": 0}

    def nan_at_step_7(*a, **k):
        loss, parts = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] == 7 else (loss, parts)

    cfg = make_cfg(
        *QUICK, "pipeline.stages.distill.epochs=3", "checkpoint.every_n_steps=2"
    )  # 4 batches per epoch
    # The teacher trains too; count only the distill stage's steps.
    from dpq.stages.distill import DistillStage

    real_run = DistillStage.run

    def counted(self, state, ctx):
        monkeypatch.setattr(dpq.distill.module, "kd_loss", nan_at_step_7)
        try:
            real_run(self, state, ctx)
        finally:
            monkeypatch.setattr(dpq.distill.module, "kd_loss", real)

    monkeypatch.setattr(DistillStage, "run", counted)
    with pytest.raises(TrainingDiverged, match=r"stage 'distill', step 6: loss is nan"):
        train(cfg)
    ckpts = sorted(
        (tmp_path / "run" / "checkpoints" / "stage_1_distill" / "lightning" / "distill").glob("*.ckpt")
    )
    assert [p.name for p in ckpts] == ["step0000004.ckpt", "step0000006.ckpt"]  # the last good steps
    state = torch.load(ckpts[-1], weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_pruned_weights_that_come_back_stop_the_run(make_cfg, tmp_path, monkeypatch):
    from dpq.stages.recover import RecoverStage

    real = RecoverStage.run

    def regrow(self, state, ctx):
        real(self, state, ctx)
        with torch.no_grad():
            w = state.student.get_submodule("hidden.0").weight
            w[~state.masks["hidden.0"]] = 0.5

    monkeypatch.setattr(RecoverStage, "run", regrow)
    with pytest.raises(
        IntegrityError, match=r"after stage 'recover': \d+ pruned weights of hidden.0 are non-zero"
    ):
        train(make_cfg(*QUICK))
    partial = json.loads((tmp_path / "run" / "results.json").read_text())
    assert partial["status"] == "integrity_failed"


def test_a_saved_model_that_does_not_reproduce_the_run_fails_it(make_cfg, tmp_path, monkeypatch):
    import dpq.run.context

    real = dpq.run.context.load_model

    def drifted(*a, **k):  # an export that lost something: the reloaded model is not the trained one
        model = real(*a, **k)
        with torch.no_grad():
            model.head.weight.mul_(-1)
        return model

    monkeypatch.setattr(dpq.run.context, "load_model", drifted)
    with pytest.raises(IntegrityError, match="the saved model reloads with accuracy"):
        train(make_cfg(*QUICK))
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (
        on_disk["status"] == "integrity_failed"
        and on_disk["final"]["reload_accuracy"] != on_disk["final"]["accuracy"]
    )


def test_a_wandb_logger_whose_backend_raises_mid_run_does_not_fail_the_run(
    make_cfg, tmp_path, monkeypatch, caplog
):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    calls = {"n": 0}
    real = WandbLogger.log_metrics

    def crashing(self, metrics, step=None):
        calls["n"] += 1
        if calls["n"] > 2:
            raise ConnectionError("wandb backend crashed")
        return real(self, metrics, step)

    monkeypatch.setattr(WandbLogger, "log_metrics", crashing)
    results = train(make_cfg(*QUICK, "logger=wandb", "logger.mode=offline"))
    assert results["status"] == "completed" and calls["n"] >= 3
    # ... and the exported model, reloaded from disk, reproduces the final metrics.
    assert results["final"]["reload_accuracy"] == results["final"]["accuracy"]
    assert results["final"]["reload_loss"] == pytest.approx(results["final"]["loss"], rel=1e-6)
    assert "tracker WandbLogger failed" in caplog.text
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "completed"
    assert (tmp_path / "run" / "checkpoints" / "stage_3_recover" / snapshot.MANIFEST).exists()
