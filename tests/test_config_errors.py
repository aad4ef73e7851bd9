"""User mistakes fail before any training, with one message naming the key."""

import subprocess
import sys

import lightning as L
import pytest

from dpq.errors import ConfigError
from dpq.train import train


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("training started before the config error was raised")

    monkeypatch.setattr(L.Trainer, "fit", boom)


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["pipeline.order=[teacher,distill,prun]"], "pipeline.order[2]", "not a stage of this pipeline"),
        (["pipeline.stages.prune.final_sparsity=1.2"], "pipeline.stages.prune.final_sparsity", "[0, 1)"),
        (["pipeline.stages.prune.final_sparsity=-0.1"], "pipeline.stages.prune.final_sparsity", "[0, 1)"),
        (["pipeline.order=[teacher,distill,quantize,prune]"], "pipeline.order", "quantization must be the last stage"),
        (["pipeline.order=[distill,prune]"], "pipeline.order", "needs a teacher stage"),
        (["pipeline.order=[teacher,distill,recover]"], "pipeline.order", "needs a prune stage"),
        (["pipeline.stages.quantize.bits=5"], "pipeline.stages.quantize.bits", "2, 3, 4, 8"),
        (["pipeline.stages.prune.kind=shrink"], "pipeline.stages.prune.kind", "unknown stage kind"),
        (["+pipeline.stages.prune.sparsity=0.3"], "pipeline.stages.prune.sparsity", "allowed"),
        (["pipeline.stages.distill.epochs=1.5"], "pipeline.stages.distill.epochs", "integer"),
        (["task=sst2"], "task", "online-only"),
        (["experiment=digits", "model=tiny_bert"], "model", "needs an mlp model"),
    ],
)
def test_bad_config_fails_before_training(make_cfg, overrides, key, words):
    cfg = make_cfg("experiment=tiny", *overrides)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert err.value.key == key
    assert words in str(err.value)


def test_cli_prints_one_clear_line_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dpq.train", "experiment=tiny", "logger=none", f"hydra.run.dir={tmp_path}",
         "pipeline.order=[teacher,distill,quantize,prune]"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "DPQ_CACHE_DIR": str(tmp_path)},
    )
    assert proc.returncode == 2
    assert "dpq: config error: pipeline.order=" in proc.stderr
    assert "Traceback" not in proc.stderr
