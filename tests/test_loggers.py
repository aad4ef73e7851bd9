import glob
import os

import pytest

from dpq import loggers


def test_wandb_without_credentials_logs_offline_into_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(loggers, "wandb_credentials", lambda: False)
    logger = loggers.build_logger(
        {"kind": "wandb", "project": "dpq-test", "mode": "auto"}, tmp_path, "t", {"a": 1}
    )
    assert logger is not None and logger._offline
    # Lightning sets WANDB_MODE=dryrun process-wide for an offline run: the next run of a multirun would
    # have read it as the user's choice and stayed offline with credentials present.
    assert "WANDB_MODE" not in os.environ
    logger.log_metrics({"result/accuracy": 0.5}, step=0)
    loggers.tolerant(logger).close({"final/accuracy": 0.5})
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    monkeypatch.setattr(loggers, "wandb_credentials", lambda: True)
    assert loggers.env_wandb_mode() is None  # so auto resolves to online for the next run


def test_a_users_wandb_mode_survives_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = loggers.build_logger({"kind": "wandb", "project": "dpq-test", "mode": "auto"}, tmp_path, "t")
    assert logger is not None and logger._offline and os.environ["WANDB_MODE"] == "offline"
    loggers.tolerant(logger).close()


def test_a_tracker_that_cannot_start_never_fails_the_run(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    def broken(self):
        raise RuntimeError("wandb service crashed")

    monkeypatch.setattr(WandbLogger, "experiment", property(broken))
    assert loggers.build_logger({"kind": "wandb", "mode": "online"}, tmp_path, "t") is None


@pytest.mark.parametrize("kind", ["csv", "tensorboard", "none"])
def test_other_loggers(tmp_path, kind):
    logger = loggers.build_logger({"kind": kind}, tmp_path, "t")
    assert (logger is None) == (kind == "none")
    if logger is not None:
        logger.log_metrics({"x": 1.0}, step=0)
        loggers.tolerant(logger).close()


def test_a_run_prints_no_library_lines_a_user_cannot_act_on(tmp_path, capfd):
    """transformers' progress bars at every model load and save (five stages: a dozen bars per run) are off
    once a run starts; so is torchao's import-time Triton warning on a machine without a GPU."""
    import logging

    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        cfg = transformers.BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
        transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "m")
        transformers.BertForSequenceClassification.from_pretrained(tmp_path / "m")
        assert "Loading weights" in capfd.readouterr().err  # what a run printed at every load
        loggers.quiet_libraries()
        transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "m2")
        transformers.BertForSequenceClassification.from_pretrained(tmp_path / "m2")
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "Writing model shards" not in err
        if not torch.cuda.is_available():
            assert not logging.getLogger("torchao.kernel.intmm").isEnabledFor(logging.WARNING)
    finally:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()


def test_every_training_stage_logs_the_learning_rate_it_trained_with(make_cfg, tmp_path):
    """Lightning's LearningRateMonitor beside each stage's losses: <stage>/lr/<param group>, starting at the
    stage's lr (no warmup here) and decaying linearly, so a dashboard shows recover's lower rate."""
    import csv

    from dpq.train import train

    stages = ("teacher", "distill", "prune", "recover", "quantize")
    cfg = make_cfg(
        "experiment=digits",
        "trainer=debug",
        "logger=csv",
        "cost.repeats=1",
        "cost.warmup=0",
        "pipeline.stages.recover.lr=1e-4",
        *[f"pipeline.stages.{s}.epochs=1" for s in stages],
    )
    train(cfg)
    series: dict[str, list[float]] = {}
    for path in (tmp_path / "run").rglob("metrics.csv"):
        for row in csv.DictReader(path.open()):
            for k, v in row.items():
                if "/lr/" in k and v:
                    series.setdefault(k, []).append(float(v))
    for s in stages:
        lrs = series[f"{s}/lr/decay"]
        assert lrs == series[f"{s}/lr/no_decay"]  # one rate for both parameter groups
        assert lrs[0] == pytest.approx(float(cfg.pipeline.stages[s].lr))
        assert len(lrs) > 1 and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert series["recover/lr/decay"][0] == pytest.approx(1e-4)


def test_a_failed_tracker_is_left_alone_then_ended_as_failed(tmp_path):
    """After its first failure nothing more is sent (no Pareto tables to a dead connection), but the run
    is still ended, marked failed: an open W&B run would be the one the next run of a multirun joins."""
    from lightning.pytorch.loggers import CSVLogger

    calls = []

    class Broken(CSVLogger):
        def log_metrics(self, metrics, step=None):
            raise ConnectionError("network gone")

        def finalize(self, status):
            calls.append(("finalize", status))

    tracker = loggers.tolerant(Broken(tmp_path))
    assert tracker.guard("tables", lambda: calls.append("tables") or 1) == 1  # healthy: it runs
    tracker.log_metrics({"x": 1.0}, step=0)
    assert tracker.failed
    tracker.log_metrics({"x": 2.0}, step=1)
    assert tracker.guard("tables", lambda: calls.append("tables again")) is None
    tracker.close({"final/accuracy": 0.5})
    tracker.close()  # once only
    assert calls == ["tables", ("finalize", "failed")]
