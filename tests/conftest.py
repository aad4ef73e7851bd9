import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from dpq.core.config import CONF_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Runs time latency in their own process (cost.latency_process=same): a fresh interpreter per record
# would add seconds to each of the hundreds of tiny runs here. tests/test_latency_process.py
# checks the separate process, which is the default everywhere else.
os.environ.setdefault("DPQ_LATENCY_PROCESS", "same")


def compose_cfg(tmp_path, overrides=()) -> DictConfig:
    """The run config as Hydra composes it, with outputs and caches under ``tmp_path``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides):
        return compose_cfg(tmp_path, overrides)

    return make


@pytest.fixture
def count_fits(monkeypatch):
    """Names of the stages that really trained (``RunContext.fit`` calls) during the test."""
    from dpq.run.context import RunContext

    calls = []
    real = RunContext.fit

    def counting(self, state, model, stage, *a, **k):
        calls.append(stage.name)
        return real(self, state, model, stage, *a, **k)

    monkeypatch.setattr(RunContext, "fit", counting)
    return calls


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Run in ``tmp_path``, offline: relative data paths start there, and nothing may reach the hub."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.fixture
def nothing_loads(monkeypatch):
    """No model may be built or loaded, no tokenizer loaded, no training started before a data error.
    (Checks may read a model's config and build its weightless skeleton: that loads nothing.)"""
    import lightning as L
    import transformers

    import dpq.run.context
    import dpq.train

    def boom(*a, **k):
        raise AssertionError("a model or tokenizer was loaded (or training started) before the data error")

    monkeypatch.setattr(L.Trainer, "fit", boom)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    monkeypatch.setattr(dpq.run.context, "build_model", boom)
    monkeypatch.setattr(dpq.train, "load_tokenizer", boom)
