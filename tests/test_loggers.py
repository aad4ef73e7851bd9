import glob

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
    logger.log_metrics({"result/accuracy": 0.5}, step=0)
    loggers.tolerant(logger).close({"final/accuracy": 0.5})
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*"))


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
