"""W&B under a sweep agent, and WANDB_MODE, without network: the sweep agent's environment is simulated
(WANDB_SWEEP_ID, WANDB_RUN_ID, WANDB_SWEEP_PARAM_PATH, W&B offline), and wandb.Api is stood in for."""

from __future__ import annotations

import logging

import pytest
import yaml

from dpq import loggers
from dpq.pareto.gather import gather, results_from_summary

OVERRIDES = {"re:.*intermediate\\.dense": 0.7}  # a mapping whose keys hold dots: logged as one value


def resolved(pipeline: str = "dp", sparsity: float = 0.3) -> dict:
    """A resolved run config as dpq.train passes it to the logger (only what these tests read)."""
    order = {"dp": ["teacher", "distill", "prune", "recover"]}[pipeline]
    return {
        "run_name": f"{pipeline}-s42",
        "seed": 42,
        "task": {"name": "toy", "primary_metric": "accuracy"},
        "pipeline": {
            "name": pipeline,
            "order": order,
            "stages": {
                "teacher": {"kind": "teacher", "epochs": 2},
                "distill": {"kind": "distill", "lr": 1e-4},
                "prune": {"kind": "prune", "final_sparsity": sparsity, "overrides": OVERRIDES, "obs": {}},
                "recover": {"kind": "recover"},
            },
        },
    }


def nonempty(d: dict) -> dict:
    """``d`` without its empty mappings, which W&B leaves out of a nested config (it always has)."""
    return {k: nonempty(v) if isinstance(v, dict) else v for k, v in d.items() if v != {}}


@pytest.fixture
def fresh_wandb():
    """W&B's process-wide setup reads the environment (the sweep's) once: a fresh one before and after."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


def start(tmp_path, name: str, config: dict) -> dict:
    logger = loggers.build_logger(
        {"kind": "wandb", "project": "dpq-test", "mode": "auto"}, tmp_path, name, config
    )
    assert logger is not None and logger._offline
    logged = dict(logger.experiment.config)
    logger.experiment.finish()
    return logged


def test_a_sweep_run_keeps_its_resolved_config_in_wandb(tmp_path, monkeypatch, fresh_wandb):
    """A swept ``pipeline: dp`` replaced the whole resolved pipeline in the W&B config (W&B merges a sweep's
    parameters shallowly, by top-level key) and a swept dotted key sat beside it as a duplicate. Now a sweep
    run logs the resolved config as dotted keys: the swept dotted key is the resolved one, the preset name sits
    beside ``pipeline.name``, and dpq.pareto reads the stage settings back. A run outside a sweep is unchanged."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(loggers, "wandb_credentials", lambda: False)

    plain = start(tmp_path / "plain", "plain", resolved())
    assert plain["pipeline"] == nonempty(
        resolved()["pipeline"]
    )  # outside a sweep: the nested config as it was

    params = tmp_path / "params.yaml"  # what `wandb agent` writes for its run
    params.write_text(
        yaml.safe_dump(
            {
                "wandb_version": 1,
                "pipeline": {"value": "dp"},
                "pipeline.stages.prune.final_sparsity": {"value": 0.3},
                "seed": {"value": 42},
            }
        )
    )
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "sweeprun1")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    import wandb

    wandb.teardown()
    swept = start(tmp_path / "swept", "swept", resolved())
    assert swept["pipeline"] == "dp"  # the sweep's own parameter, as the sweep set it
    assert swept["pipeline.name"] == "dp"
    assert swept["pipeline.order"] == ["teacher", "distill", "prune", "recover"]
    assert swept["pipeline.stages.prune.final_sparsity"] == 0.3
    assert swept["pipeline.stages.prune.overrides"] == OVERRIDES
    assert swept["task.primary_metric"] == "accuracy" and swept["seed"] == 42
    assert not any(
        isinstance(v, dict) and k != "_wandb" and v and "." not in next(iter(v)) for k, v in swept.items()
    )

    for config in (plain, swept):  # both read back as the resolved config
        res = results_from_summary(config, {"final/accuracy": 0.8}, "r")
        assert res["pipeline"] == "dp" and res["order"] == ["teacher", "distill", "prune", "recover"]
        assert res["final"]["stage"] == "recover"
        assert nonempty(res["config"]["pipeline"]["stages"]["prune"]) == nonempty(
            resolved()["pipeline"]["stages"]["prune"]
        )
        assert res["config"]["task"] == resolved()["task"]


class Recorder:
    """Lightning's WandbLogger stood in for: records the mode it was asked for, starts nothing."""

    made: list[dict] = []

    def __init__(self, offline=False, mode=None, settings=None, **kwargs):
        Recorder.made.append({"offline": offline, "mode": mode})
        self._offline = offline
        self.experiment = object()


@pytest.mark.parametrize(
    ("env", "credentials", "want"),
    [
        ("disabled", True, None),
        ("disabled", False, None),
        ("dryrun", True, "offline"),  # what Lightning's WandbLogger sets in-process for an offline run
        ("DryRun", True, "offline"),
    ],
)
def test_wandb_mode_from_the_environment_is_honoured_under_mode_auto(
    monkeypatch, tmp_path, env, credentials, want
):
    """An explicit mode passed to wandb.init overrides WANDB_MODE, so mode=auto must read it: disabled means
    no tracker at all (as logger=none); dryrun is offline."""
    import lightning.pytorch.loggers as pl_loggers

    Recorder.made = []
    monkeypatch.setattr(pl_loggers, "WandbLogger", Recorder)
    monkeypatch.setattr(loggers, "wandb_credentials", lambda: credentials)
    monkeypatch.setenv("WANDB_MODE", env)
    logger = loggers.build_logger({"kind": "wandb", "mode": "auto"}, tmp_path, "t", {"a": 1})
    if want is None:
        assert logger is None and Recorder.made == []
        assert not (tmp_path / "wandb").exists()
    else:
        assert Recorder.made == [{"offline": True, "mode": want}] and logger._offline


def as_dotted(d: dict, prefix: str = "") -> dict:
    """``d`` as a sweep run's W&B config has it (dpq.loggers.flat_config, spelt out here)."""
    out: dict = {}
    for k, v in d.items():
        out.update(as_dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def test_pareto_reads_a_sweep_run_config_in_every_form_and_skips_an_unreadable_run(monkeypatch, caplog):
    """Runs without an uploaded results.json are rebuilt from their W&B config and summary: nested (outside a
    sweep), dotted (a sweep run now), and a swept preset name with only the swept keys (a sweep run logged
    before dotted keys: the AttributeError there ended the whole report). One unreadable run is skipped with
    a warning naming it; the report goes on."""
    from test_pareto import FakeRun, fake_results, fake_wandb_sweep

    nested = fake_results("dq", 1, 0.90, 0.68)["config"]
    dotted = {**as_dotted(fake_results("dpq", 1, 0.88, 0.55, sparsity=0.2)["config"]), "pipeline": "dpq"}
    dotted["pipeline.stages.prune.final_sparsity"] = 0.2  # the sweep's own parameter: the same key
    old = {"pipeline": "dp", "pipeline.stages.prune.final_sparsity": 0.3, "seed": 42, "task": {"name": "toy"}}
    summary = {"final/accuracy": 0.85, "final/effective_gflops": 0.5}
    fake_wandb_sweep(
        monkeypatch,
        [
            FakeRun("nested", "finished", None, nested, summary),
            FakeRun("dotted", "finished", None, dotted, summary),
            FakeRun("old", "finished", None, old, summary),
            FakeRun("broken", "finished", None, None, summary),  # its config cannot be read at all
        ],
    )
    with caplog.at_level(logging.WARNING):
        pts = gather(["me/dpq/abc123"], progress=False)
    finals = pts[pts["kind"] == "final"].set_index("run")
    assert sorted(finals.index) == ["me/dpq/dotted", "me/dpq/nested", "me/dpq/old"]
    assert finals.loc["me/dpq/nested", "label"] == "dq 4-bit"
    assert finals.loc["me/dpq/dotted", "label"] == "dpq 0.2 sparse 4-bit"
    assert finals.loc["me/dpq/old", "label"] == "dp 0.3 sparse"  # rebuilt from conf/pipeline/dp.yaml
    assert "me/dpq/broken" in caplog.text and "skipping" in caplog.text
    assert "old" in caplog.text and "conf/pipeline/dp.yaml" in caplog.text


def test_a_wandb_group_holds_one_configurations_seeds(tmp_path):
    """Run names repeat across a grid's sparsities (dp-rotten_tomatoes-minilm_l3-s42 for each): the default
    W&B group is the configuration without its seed, the key dpq.pareto merges seeds by."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from dpq.pareto.gather import config_key, identity
    from dpq.run.context import tracker_settings

    def group(*overrides):
        cfg = OmegaConf.to_container(compose_cfg(tmp_path, ["logger=wandb", *overrides]), resolve=True)
        return tracker_settings(cfg)["group"], cfg

    g42, cfg = group("pipeline=dp", "seed=42")
    assert g42 == group("pipeline=dp", "seed=43")[0]
    assert g42.startswith("dp-rotten_tomatoes-minilm_l3-") and g42.endswith(config_key(identity(cfg)))
    assert g42 != group("pipeline=dp", "pipeline.stages.prune.final_sparsity=0.7")[0]
    assert group("pipeline=dp", "logger.group=mine")[0] == "mine"
    plain = OmegaConf.to_container(compose_cfg(tmp_path, ["logger=csv"]), resolve=True)
    assert "group" not in tracker_settings(plain)
