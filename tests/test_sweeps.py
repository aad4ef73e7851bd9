"""Sweeps: every W&B sweep file is valid, the commands its agent would run compose a valid run
config (and run on tiny_bert), the Hydra/Optuna twins match, and trials reuse shared prefixes."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import compose_cfg
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dpq.core.config import CONF_DIR, list_options
from dpq.core.errors import ConfigError
from dpq.run.validate import check_wandb_sweep, validate

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
COMMAND = ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
TINY = ["experiment=tiny", "cost.repeats=1", "cost.warmup=0"]
# conf/experiment/tiny.yaml's settings, for commands that name another experiment
TINY_GROUPS = [
    "teacher=tiny_bert",
    "model=tiny_bert",
    "trainer=debug",
    "task.subsample=256",
    "cost.repeats=1",
    "cost.warmup=0",
]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def agent_args(values: dict) -> list[str]:
    """``${args_no_hyphens}`` exactly as the W&B agent builds it from a run's parameter values."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})[
        "args_no_hyphens"
    ]


def agent_command(sweep: dict, values: dict) -> list[str]:
    """The agent's command line: its macro expansion of ``command`` (wandb_agent.Agent._command_run)."""
    macros = {
        "env": ["/usr/bin/env"],
        "interpreter": ["python"],
        "program": [sweep["program"]],
        "args_no_hyphens": agent_args(values),
    }
    out: list[str] = []
    for c in sweep["command"]:
        out += macros[c[2:-1]] if c.startswith("${") and c.endswith("}") else [c]
    return out


def points(sweep: dict, n_samples: int = 6, seed: int = 0, full_grid: bool = True) -> list[dict]:
    """Parameter values an agent may be handed: the whole grid (or, ``full_grid=False``, a set of
    points in which every value of every parameter occurs), or samples (with both ends) of a search."""
    params = sweep["parameters"]
    if sweep["method"] == "grid":
        keys = list(params)
        choices = [p["values"] if "values" in p else [p["value"]] for p in params.values()]
        if not full_grid:
            return [{k: c[i % len(c)] for k, c in zip(keys, choices)} for i in range(max(map(len, choices)))]
        return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]
    rng = random.Random(seed)
    out = []
    for i in range(n_samples):
        point = {}
        for k, p in params.items():
            if "value" in p:
                point[k] = p["value"]
            elif "values" in p:
                point[k] = p["values"][i % len(p["values"])]
            else:
                lo, hi = p["min"], p["max"]
                point[k] = lo if i == 0 else hi if i == 1 else rng.uniform(lo, hi)
        out.append(point)
    return out


def compose_hydra(*overrides) -> OmegaConf:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=["logger=none", *overrides], return_hydra_config=True)


# ---- the sweep files ----------------------------------------------------------------------------


def test_the_documented_sweep_files_exist():
    assert {p.stem for p in SWEEPS} == {"sparsity_grid", "orderings", "pareto_bayes", "far_front"}
    assert (ROOT / "sweeps" / "README.md").exists()


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_each_sweep_file_is_a_valid_wandb_sweep_with_the_plain_override_command(path):
    sweep = load(path)
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["goal"] in ("maximize", "minimize") and sweep["metric"]["name"].startswith(
        "final/"
    )
    check_wandb_sweep(sweep, path.name)  # ConfigError if it optimises a test metric
    assert sweep["command"] == COMMAND
    assert (ROOT / sweep["program"]).is_file()
    for key, spec in sweep["parameters"].items():
        assert "+" not in key and not key.startswith("-"), key  # W&B rejects '+'; Hydra needs plain key=value
        kinds = [k for k in ("value", "values", "distribution") if k in spec]
        assert len(kinds) == 1, (key, spec)
        if kinds == ["distribution"]:
            assert sweep["method"] != "grid", key  # a grid cannot enumerate a continuous range
            assert spec["distribution"] == "uniform" and spec["min"] < spec["max"], key
    orderings = sweep["parameters"]["pipeline"]
    assert set(orderings["values"]) <= set(list_options("pipeline"))  # categorical choice of presets


def test_the_orderings_sweep_covers_every_preset_including_spiral():
    values = load(ROOT / "sweeps" / "orderings.yaml")["parameters"]["pipeline"]["values"]
    assert sorted(values) == sorted(list_options("pipeline")) and "spiral" in values


def test_the_far_front_study_puts_five_orderings_at_both_far_points(tmp_path):
    """Issue 21's study: dq, dpq, spiral, prune-before-distill and quantize-aware pruning at 80%
    unstructured and at 70% heads+neurons (3.19x fewer dense GFLOPs), three seeds; every ordering
    that prunes gets the point's target, granularity and criterion."""
    params = load(ROOT / "sweeps" / "far_front.yaml")["parameters"]
    assert params["pipeline"]["values"] == ["dq", "dpq", "spiral", "pd", "dpq_qat"]
    assert params["experiment"]["values"] == ["far_u80", "deploy70"]
    assert params["seed"]["values"] == [42, 43, 44]
    hydra_twin = load(ROOT / "conf" / "hparams_search" / "far_front.yaml")["hydra"]["sweeper"]["params"]
    assert (
        hydra_twin["experiment"] == "far_u80,deploy70"
        and hydra_twin["pipeline"] == "dq,dpq,spiral,pd,dpq_qat"
    )
    u80 = compose_cfg(tmp_path, ["experiment=far_u80", "pipeline=pd"])
    assert list(u80.pipeline.order) == ["teacher", "prune", "distill", "quantize"]
    assert u80.pipeline.stages.prune.final_sparsity == 0.8 and u80.pipeline.stages.prune.scope == "global"
    spiral = compose_cfg(tmp_path, ["experiment=far_u80", "pipeline=spiral"]).pipeline.stages.spiral
    assert spiral.final_sparsity == 0.8 and spiral.prune.epochs == 2  # the target interpolated
    assert spiral.prune.criterion == "taylor" and spiral.prune.scope == "global"  # as the prune stage
    for pipeline in ("dpq", "pd", "dpq_qat"):
        prune = compose_cfg(tmp_path, ["experiment=deploy70", f"pipeline={pipeline}"]).pipeline.stages.prune
        assert (prune.granularity, prune.criterion, prune.final_sparsity) == ("heads+neurons", "taylor", 0.7)
    spiral = compose_cfg(tmp_path, ["experiment=deploy70", "pipeline=spiral"]).pipeline.stages.spiral
    assert spiral.prune.granularity == "heads+neurons" and spiral.final_sparsity == 0.7
    qa = compose_cfg(tmp_path, ["experiment=deploy70", "pipeline=dpq_qat"]).pipeline.stages
    assert qa.prune.qat == "quantize" and qa.recover.qat == "quantize" and qa.recover.epochs == 8
    hn = compose_cfg(tmp_path, ["experiment=far_hn33", "pipeline=spiral"]).pipeline.stages
    assert hn.prune.flops_target == 0.33 and hn.spiral.prune.granularity == "heads+neurons"


def test_the_sparsity_grid_spans_targets_0_1_to_0_9_over_several_orderings():
    params = load(ROOT / "sweeps" / "sparsity_grid.yaml")["parameters"]
    assert params["pipeline.stages.prune.final_sparsity"]["values"] == pytest.approx(
        [i / 10 for i in range(1, 10)]
    )
    assert len(params["pipeline"]["values"]) >= 3


def test_the_agent_command_is_plain_hydra_overrides():
    sweep = load(ROOT / "sweeps" / "sparsity_grid.yaml")
    cmd = agent_command(sweep, {"pipeline": "dp", "pipeline.stages.prune.final_sparsity": 0.3, "seed": 42})
    assert cmd == [
        "/usr/bin/env",
        "python",
        "sweeps/train.py",
        "pipeline=dp",
        "pipeline.stages.prune.final_sparsity=0.3",
        "seed=42",
    ]


def check_agent_commands(tmp_path, sweep: dict, pts: list[dict]) -> None:
    from dpq.run.validate import validate

    for point in pts:
        cmd = agent_command(sweep, point)
        cfg = compose_cfg(tmp_path, cmd[3:])
        for key, value in point.items():
            if key == "experiment":  # a config group, not a key: test_the_far_front_* checks what it sets
                continue
            got = cfg.pipeline.name if key == "pipeline" else OmegaConf.select(cfg, key)
            assert got == pytest.approx(value) if isinstance(value, float) else got == value, (
                key,
                got,
                value,
            )
        stages = validate(OmegaConf.to_container(cfg, resolve=True))  # ConfigError if any trial could not run
        assert [s.name for s in stages] == list(cfg.pipeline.order)
        if "pipeline.stages.prune.final_sparsity" in point and cfg.pipeline.name == "spiral":
            assert cfg.pipeline.stages.spiral.final_sparsity == pytest.approx(
                point["pipeline.stages.prune.final_sparsity"]
            )


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_agent_commands_with_every_parameter_value_compose_a_valid_run_config(tmp_path, path):
    sweep = load(path)
    pts = points(sweep, full_grid=False)
    for key, spec in sweep["parameters"].items():  # every value of every parameter is tried
        if "values" in spec:
            assert {repr(p[key]) for p in pts} == {repr(v) for v in spec["values"]}, key
    check_agent_commands(tmp_path, sweep, pts)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in SWEEPS if load(p)["method"] == "grid"], ids=lambda p: p.stem)
def test_every_command_of_a_whole_grid_composes_a_valid_run_config(tmp_path, path):
    sweep = load(path)
    check_agent_commands(tmp_path, sweep, points(sweep))


# ---- objectives: the validation split only -------------------------------------------------------


@pytest.mark.parametrize(
    "metric, weight",
    [
        ("final/accuracy", None),
        ("final/loss", None),
        ("final/objective", "objective.weights.accuracy"),
        ("final/val_accuracy", "objective.weights.loss"),
    ],
)
def test_a_wandb_sweep_on_a_test_metric_is_a_config_error(metric, weight):
    sweep = load(ROOT / "sweeps" / "pareto_bayes.yaml")
    sweep["metric"]["name"] = metric
    if weight:
        sweep["parameters"][weight] = {"value": 1.0}
    with pytest.raises(ConfigError, match="test split") as e:
        check_wandb_sweep(sweep, "sweep.yaml")
    assert "val_" in str(e.value) and "sweep.yaml" in e.value.key


def test_wandb_sweeps_may_optimise_validation_and_cost_metrics_only():
    sweep = load(ROOT / "sweeps" / "sparsity_grid.yaml")
    for name, goal in (
        ("final/val_accuracy", "maximize"),
        ("final/val_loss", "minimize"),
        ("final/effective_gflops", "minimize"),
        ("final/latency_ms_median", "minimize"),
    ):
        check_wandb_sweep({**sweep, "metric": {"name": name, "goal": goal}}, "s.yaml")
        wrong = "maximize" if goal == "minimize" else "minimize"
        with pytest.raises(ConfigError, match=f"metric.goal='{wrong}': {name} is better"):  # the worst model
            check_wandb_sweep({**sweep, "metric": {"name": name, "goal": wrong}}, "s.yaml")
    for bad, why in (("final/acc", "must be a validation or cost metric"), ("val_accuracy", "final/<metric")):
        with pytest.raises(ConfigError, match=why):
            check_wandb_sweep({**sweep, "metric": {"name": bad, "goal": "maximize"}}, "s.yaml")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["objective.metrics=[accuracy]"], "objective.metrics"),
        (["objective.metrics=[val_accuracy,loss]"], "objective.metrics"),
        (["+objective.weights.accuracy=1.0"], "objective.weights.accuracy"),
        (
            ["hparams_search=pareto_multi", "objective.metrics=[accuracy,effective_gflops]"],
            "objective.metrics",
        ),
    ],
)
def test_an_objective_on_a_test_metric_is_a_config_error(tmp_path, overrides, key):
    cfg = OmegaConf.to_container(compose_cfg(tmp_path, ["experiment=tiny", *overrides]), resolve=True)
    with pytest.raises(ConfigError, match="test split; models are selected on the validation split") as e:
        validate(cfg)
    assert e.value.key == key and "val_" in str(e.value)


def test_objectives_default_to_validation_accuracy_and_every_study_validates(tmp_path):
    cfg = compose_cfg(tmp_path, ["experiment=tiny"])
    assert list(cfg.objective.metrics) == ["val_accuracy"]
    assert dict(cfg.objective.weights) == {"val_accuracy": 1.0, "effective_gflops": -0.1}
    for study in list_options("hparams_search"):
        composed = compose_cfg(tmp_path, ["experiment=tiny", f"hparams_search={study}"])
        validate(OmegaConf.to_container(composed, resolve=True))  # ConfigError on a test metric
    for ok in (["objective.metrics=[val_loss,size_bytes]"], ["+objective.weights.latency_ms_median=-1"]):
        validate(OmegaConf.to_container(compose_cfg(tmp_path, ["experiment=tiny", *ok]), resolve=True))


# ---- the Hydra multirun / Optuna twins ------------------------------------------------------------


def _basic_params(cfg) -> dict[str, list[str]]:
    return {k: [v.strip() for v in str(s).split(",")] for k, s in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize("name", ["sparsity_grid", "orderings", "far_front"])
def test_the_hydra_grid_twins_sweep_the_same_values_as_the_wandb_grids(name):
    cfg = compose_hydra(f"hparams_search={name}")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    wandb_params = load(ROOT / "sweeps" / f"{name}.yaml")["parameters"]
    want = {
        k: [str(v) for v in (p["values"] if "values" in p else [p["value"]])] for k, p in wandb_params.items()
    }
    assert _basic_params(cfg) == want


def _optuna_params(cfg) -> dict[str, tuple]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # noqa: F401  (plugins registered)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = {}
    # the sweeper's params, and the stage settings it samples per trial (dpq.run.search_space)
    for k, v in [*cfg.hydra.sweeper.params.items(), *(cfg.get("stage_params") or {}).items()]:
        o = parser.parse_override(f"{k}={v}")
        val = o.value()
        if hasattr(val, "list"):
            out[k] = ("choice", list(val.list))
        else:
            out[k] = ("interval", (val.start, val.end))
    return out


def test_the_optuna_bayes_twin_searches_the_wandb_space_on_the_same_objective():
    cfg = compose_hydra("hparams_search=pareto_bayes")
    assert (
        cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
        and str(cfg.hydra.sweeper.direction) == "maximize"
    )
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    wandb = load(ROOT / "sweeps" / "pareto_bayes.yaml")
    optuna = _optuna_params(cfg)
    for key, spec in wandb["parameters"].items():
        if "value" in spec:  # fixed: the objective's weights and the seed
            assert OmegaConf.select(cfg, key) == spec["value"], key
        elif "values" in spec:
            assert optuna[key] == ("choice", spec["values"]), key
        else:
            assert optuna[key] == ("interval", (spec["min"], spec["max"])), key
    assert set(optuna) == {k for k, s in wandb["parameters"].items() if "value" not in s}
    assert list(cfg.objective.metrics) == ["objective"] and wandb["metric"]["name"] == "final/objective"


def test_the_multi_objective_study_maximises_val_accuracy_and_minimises_effective_gflops():
    import hydra

    cfg = compose_hydra("hparams_search=pareto_multi")
    assert list(cfg.objective.metrics) == ["val_accuracy", "effective_gflops"]
    assert list(cfg.hydra.sweeper.direction) == ["maximize", "minimize"]
    sampler = hydra.utils.instantiate(cfg.hydra.sweeper.sampler)
    assert type(sampler).__name__ == "NSGAIISampler"
    assert set(_optuna_params(cfg)) == {
        "pipeline",
        "pipeline.stages.prune.final_sparsity",
        "pipeline.stages.quantize.bits",
    }


@pytest.mark.parametrize("study", ["pareto_bayes", "pareto_multi"])
def test_an_optuna_trial_samples_a_stage_setting_only_when_its_pipeline_runs_the_stage(study):
    """bits is sampled for dpq, dq and spiral trials (each quantizes), never for dp's (no quantize stage); a value
    fixed on the command line is left to the sweeper; the trial's overrides compose the job's pipeline."""
    import optuna

    from dpq.run.search_space import HOOK, stage_params

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", f"hparams_search={study}"], return_hydra_config=True)
        assert cfg.hydra.sweeper.custom_search_space == HOOK
        assert "pipeline.stages.quantize.bits" not in cfg.hydra.sweeper.params
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        sampled = {}
        for name in ("dpq", "dp", "spiral", "dq", "dpq"):
            study.enqueue_trial({"pipeline": name})
            trial = study.ask()
            trial.suggest_categorical("pipeline", ["dpq", "dp", "spiral", "dq"])
            trial.set_user_attr("hparams_search", cfg.hydra.runtime.choices.hparams_search)
            stage_params(cfg, trial)  # as the sweeper calls it: composes the trial's job
            sampled.setdefault(name, []).append(dict(trial.params))
        fixed = study.ask()
        fixed.suggest_categorical("pipeline", ["dpq", "dp", "spiral", "dq"])
        fixed.set_user_attr("pipeline.stages.quantize.bits", "4")  # a plain override on the command line
        stage_params(cfg, fixed)
    for name, trials in sampled.items():
        for params in trials:
            if name == "dp":
                assert params == {"pipeline": "dp"}
            else:
                assert set(params) == {"pipeline", "pipeline.stages.quantize.bits"}, name
                assert params["pipeline.stages.quantize.bits"] in (4, 8)
    assert "pipeline.stages.quantize.bits" not in fixed.params


@pytest.mark.parametrize(
    "overrides, key, says",
    [
        (
            ["hparams_search=pareto_bayes", "stage_params={pipeline.stages.quantize.bits:4}"],
            "stage_params.pipeline.stages.quantize.bits",
            "must be a sweep",
        ),
        (
            ["hparams_search=pareto_bayes", "+stage_params.bits='choice(4,8)'"],
            "stage_params",
            "keys are stage settings",
        ),
        (
            ["hparams_search=pareto_bayes", "stage_params={pipeline.stages.quantize.bits:'oops(4)'}"],
            "stage_params.pipeline.stages.quantize.bits",
            "must be a sweep",
        ),
        # a misspelt stage was never sampled, a misspelt setting sampled and refused as each trial composed
        (
            ["hparams_search=pareto_bayes", "+stage_params={pipeline.stages.quantise.bits:'choice(2,4)'}"],
            "stage_params.pipeline.stages.quantise.bits",
            r"names stage 'quantise', which no pipeline of this study has \(did you mean pipeline.stages.quantize",
        ),
        (
            ["hparams_search=pareto_bayes", "+stage_params={pipeline.stages.quantize.bitz:'choice(2,4)'}"],
            "stage_params.pipeline.stages.quantize.bitz",
            r"stage 'quantize' has no setting 'bitz' \(did you mean pipeline.stages.quantize.bits\?\)",
        ),
        (
            ["hparams_search=pareto_bayes", "hydra.sweeper.custom_search_space=null"],
            "hydra.sweeper.custom_search_space",
            "would be ignored",
        ),
        (
            ["hparams_search=sparsity_grid", "+stage_params={pipeline.stages.quantize.bits:'choice(4,8)'}"],
            "stage_params",
            "Optuna studies only",
        ),
    ],
)
def test_stage_params_mistakes_are_refused_before_the_first_trial(overrides, key, says):
    from dpq.run.multirun import check_sweeper

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):  # as in Hydra's callback
        cfg = compose("train", overrides=["logger=none", *overrides], return_hydra_config=True)
        with pytest.raises(ConfigError, match=says) as e:
            check_sweeper(cfg)
    assert e.value.key == key


def test_stage_params_of_a_stage_only_some_pipelines_of_the_study_have_are_accepted():
    from dpq.run.multirun import check_sweeper

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        over = ["logger=none", "hparams_search=pareto_bayes"]
        spiral = "+stage_params={pipeline.stages.spiral.rounds:'choice(2,3)'}"
        check_sweeper(compose("train", overrides=[*over, spiral], return_hydra_config=True))
        no_spiral = "hydra.sweeper.params.pipeline='choice(dpq,dp)'"
        with pytest.raises(ConfigError, match="names stage 'spiral', which no pipeline of this study has"):
            check_sweeper(compose("train", overrides=[*over, spiral, no_spiral], return_hydra_config=True))


def test_a_stage_setting_sampled_in_two_places_is_refused():
    from omegaconf import open_dict

    from dpq.run.multirun import check_sweeper

    cfg = compose_hydra("hparams_search=pareto_bayes")
    check_sweeper(cfg)  # as shipped
    with open_dict(cfg):  # one setting sampled in two places
        cfg.hydra.sweeper.params["pipeline.stages.quantize.bits"] = "choice(2, 4)"
    with pytest.raises(ConfigError, match="also in hydra.sweeper.params"):
        check_sweeper(cfg)


def test_the_slurm_launcher_config_composes_on_submitit():
    cfg = compose_hydra(
        "hparams_search=sparsity_grid", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"
    )
    assert (
        cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.tasks_per_node == 1


# ---- real trials (slow) -------------------------------------------------------------------------


def _env(tmp_path) -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        "DPQ_CACHE_DIR": str(tmp_path / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # `env python` = this venv
    for k in ("WANDB_API_KEY", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the sweeps' trials, as on an agent's machine: they share the teacher (and more)."""
    return tmp_path_factory.mktemp("agent_machine")


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_one_agent_trial_per_sweep_runs_on_tiny_bert_and_logs_offline(tmp_path, shared_cache, path):
    sweep = load(path)
    point = points(sweep)[0]
    cmd = agent_command(sweep, point)
    run_dir = tmp_path / "run"
    # What a user appends for a quick check (a sweep that picks the experiment takes tiny's groups one by one).
    tiny = TINY_GROUPS if "experiment" in point else TINY
    extra = [*tiny, "logger=wandb", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(
        [*cmd, *extra], cwd=ROOT, env=_env(shared_cache), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["pipeline"] == point["pipeline"]
    for key, value in point.items():
        if key not in ("pipeline", "experiment"):
            got = results["config"]
            for part in key.split("."):
                got = got[part]
            assert got == pytest.approx(value), key
    pruned = [r for r in results["stages"] if r["kind"] == "prune" or r["stage"].endswith(".prune")]
    if pruned:  # the target is met where pruning ends (4-bit rounding may add zeros afterwards)
        want = point.get("pipeline.stages.prune.final_sparsity", 0.5)
        assert pruned[-1]["metrics"]["sparsity"] == pytest.approx(want, abs=0.01)
        assert results["final"]["sparsity"] >= want - 0.01
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, "W&B must log offline without network (upload later with `wandb sync`)"


@pytest.mark.slow
def test_the_scalarised_objective_is_computed_and_returned(tmp_path):
    from dpq.train import train

    cfg = compose_cfg(tmp_path, [*TINY, "pipeline=dp", "objective.weights.effective_gflops=-0.5"])
    final = train(cfg)["final"]
    assert final["objective"] == pytest.approx(final["val_accuracy"] - 0.5 * final["effective_gflops"])


@pytest.mark.slow
def test_the_multi_objective_optuna_study_and_dpq_pareto_report_the_same_front(tmp_path):
    sweep_dir = tmp_path / "study"
    cmd = [
        sys.executable,
        "-m",
        "dpq.train",
        "hparams_search=pareto_multi",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.population_size=3",
        "pipeline.stages.quantize.bits=4",
        f"hydra.sweep.dir={sweep_dir}",
        *TINY,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    solutions = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))["solutions"]
    runs = [json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")]
    assert len(runs) == 3 and solutions
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpq.pareto",
            str(sweep_dir),
            "-O",
            "val_accuracy,effective_gflops",
            "--no-references",
            "--no-progress",
            "-o",
            str(tmp_path / "pareto"),
        ],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    import pandas as pd

    front = pd.read_csv(tmp_path / "pareto" / "pareto.csv")
    front = front[front["pareto"]]
    ours = {(round(a, 6), round(g, 6)) for a, g in zip(front["val_accuracy"], front["effective_gflops"])}
    theirs = {(round(v[0], 6), round(v[1], 6)) for v in (s["values"] for s in solutions)}
    assert ours == theirs


# ---- the stage cache across trials (slow; needs the pipeline integration) -------------------------


@pytest.mark.slow
def test_a_second_trial_with_the_same_prefix_reuses_it_and_matches_a_cold_run(tmp_path, count_fits):
    from dpq.train import train

    def trial(name, sparsity, *extra):
        cfg = compose_cfg(
            tmp_path / name,
            [*TINY, "pipeline=dp", f"pipeline.stages.prune.final_sparsity={sparsity}", *extra],
        )
        cfg.paths.cache_dir = str(
            tmp_path / ("cache" if "stage_cache.enabled=false" not in extra else "cold_cache")
        )
        return train(cfg)

    first = trial("a", 0.3)
    assert count_fits == ["teacher", "distill", "prune", "recover"]
    count_fits.clear()
    second = trial("b", 0.6)
    assert count_fits == ["prune", "recover"]  # no second teacher or distill training
    by_stage = {r["stage"]: r for r in second["stages"]}
    assert by_stage["teacher"].get("cached") is True and by_stage["distill"].get("cached") is True
    assert not by_stage["prune"].get("cached") and not by_stage["recover"].get("cached")
    assert by_stage["distill"]["metrics"]["accuracy"] == first["stages"][1]["metrics"]["accuracy"]
    count_fits.clear()
    cold = trial("c", 0.6, "stage_cache.enabled=false")
    assert count_fits == ["teacher", "distill", "prune", "recover"]
    assert second["final"]["sparsity"] == pytest.approx(0.6, abs=0.01)
    for k in ("accuracy", "loss", "val_accuracy", "sparsity", "params_nonzero"):  # reuse changes no number
        assert second["final"][k] == pytest.approx(cold["final"][k], abs=1e-6), k


@pytest.mark.slow
def test_a_prefix_evicted_between_lookup_and_read_is_trained_again(tmp_path, count_fits, monkeypatch):
    """`python -m dpq.stage_cache prune` racing a run: the run found the entry, the entry went before
    the run took its reader's lock; the run trains the prefix again, from a clean state."""
    from dpq.run.stage_cache import StageCache
    from dpq.train import train

    def trial(name):
        cfg = compose_cfg(tmp_path / name, [*TINY, "pipeline=dp"])
        cfg.paths.cache_dir = str(tmp_path / "cache")
        return train(cfg)

    first = trial("a")
    count_fits.clear()
    reading = StageCache.reading

    def evicted_first(self, key):
        assert self.evict(key)
        return reading(self, key)

    monkeypatch.setattr(StageCache, "reading", evicted_first)
    second = trial("b")
    # nothing restored from the stage cache (the teacher comes from the separate teacher cache)
    assert count_fits == ["distill", "prune", "recover"]
    assert not any(r.get("cached_from") for r in second["stages"])
    assert [r["stage"] for r in second["stages"]] == [
        r["stage"] for r in first["stages"]
    ]  # no doubled records
    assert second["final"]["accuracy"] == pytest.approx(first["final"]["accuracy"], abs=1e-6)


@pytest.mark.slow
def test_two_concurrent_trials_that_share_a_missing_prefix_both_finish_correctly(tmp_path):
    from dpq.run.stage_cache import MANIFEST

    def start(name, sparsity):
        cmd = [
            sys.executable,
            "-m",
            "dpq.train",
            *TINY,
            "logger=none",
            "pipeline=dp",
            f"pipeline.stages.prune.final_sparsity={sparsity}",
            f"hydra.run.dir={tmp_path / name}",
        ]
        return subprocess.Popen(
            cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    procs = {"a": (start("a", 0.3), 0.3), "b": (start("b", 0.6), 0.6)}  # both miss teacher -> distill
    results = {}
    for name, (p, sparsity) in procs.items():
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-4000:]
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
        assert results[name]["final"]["sparsity"] == pytest.approx(sparsity, abs=0.01)
    a, b = ({r["stage"]: r for r in results[n]["stages"]} for n in ("a", "b"))
    for stage in ("teacher", "distill"):  # the same prefix state, whoever built it
        assert a[stage]["metrics"]["accuracy"] == b[stage]["metrics"]["accuracy"]
        assert a[stage]["metrics"]["loss"] == pytest.approx(b[stage]["metrics"]["loss"], abs=1e-9)
    stages_dir = tmp_path / "cache" / "stages"
    entries = [d for d in stages_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert entries and all((d / MANIFEST).exists() for d in entries)  # only whole entries
    assert not list(stages_dir.glob(".tmp-*"))
    third = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpq.train",
            *TINY,
            "logger=none",
            "pipeline=dp",
            "pipeline.stages.prune.final_sparsity=0.45",
            f"hydra.run.dir={tmp_path / 'c'}",
        ],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert third.returncode == 0, third.stderr[-4000:]
    c = {r["stage"]: r for r in json.loads((tmp_path / "c" / "results.json").read_text())["stages"]}
    assert c["teacher"].get("cached") is True and c["distill"].get("cached") is True
    assert c["distill"]["metrics"]["accuracy"] == a["distill"]["metrics"]["accuracy"]
