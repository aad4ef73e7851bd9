"""``dry_run=true``: every check a run makes before its first stage, then each stage's settings and where its
state would come from (stage cache, teacher cache, training); nothing is trained or loaded, and nothing
written but Hydra's .hydra/ and log."""

from __future__ import annotations

import os
import re

import pytest
from conftest import compose_cfg
from omegaconf import open_dict
from test_own_data import COLUMNS, GOOD, bad_case, compose, conf_file, task_yaml

from dpq.core.errors import ConfigError
from dpq.train import train

TINY = ["experiment=tiny", "cost.repeats=2", "cost.warmup=1"]
DPQ = ["teacher", "distill", "prune", "recover", "quantize"]


def cfg(tmp_path, out: str, *overrides):
    """A tiny run writing to ``tmp_path/out``; every run of a test shares ``tmp_path/cache``."""
    c = compose_cfg(tmp_path, [*TINY, *overrides])
    with open_dict(c):
        c.paths.output_dir = str(tmp_path / out)
    return c


def test_a_dry_run_trains_and_writes_nothing_and_says_what_the_caches_would_serve(tmp_path, count_fits):
    dry = train(cfg(tmp_path, "dry", "dry_run=true"))
    assert [s["stage"] for s in dry["stages"]] == DPQ
    assert [s["source"] for s in dry["stages"]] == ["train"] * 5  # an empty cache
    prune = dry["stages"][2]
    assert prune["length"] == "2 epochs" and "final_sparsity=0.5" in prune["settings"]
    assert "bits=4" in dry["stages"][4]["settings"]
    assert "overrides" not in prune["settings"] and "flops_target" not in prune["settings"]  # off: not shown
    assert dry["data"]["sizes"] == {"train": 256, "validation": 64, "test": 64}
    assert dry["data"]["batches_per_epoch"] == 8  # 256 examples, task.batch_size 32
    assert dry["data"]["processes"] == 1 and dry["data"]["steps_per_epoch"] == 4  # trainer=debug: 4 batches
    assert dry["data"]["batches_used"] == 4  # the caption says "8 training batches per epoch (4 used: ...)"
    assert count_fits == []
    assert (
        not (tmp_path / "dry" / "results.json").exists() and not (tmp_path / "dry" / "checkpoints").exists()
    )
    assert not list((tmp_path / "cache").rglob("dpq-stage-cache.json"))

    train(cfg(tmp_path, "dq", "pipeline=dq"))  # trains the teacher and the distillation dpq starts with
    assert count_fits == ["teacher", "distill", "quantize"]
    manifests = sorted((tmp_path / "cache").rglob("dpq-stage-cache.json"))
    used = [m.stat().st_mtime_ns for m in manifests]
    for m in manifests:  # as if used long ago
        os.utime(m, ns=(10**18, 10**18))
    dry = train(cfg(tmp_path, "dry2", "dry_run=true"))
    src = [s["source"] for s in dry["stages"]]
    assert src[0] == src[1] and src[0].startswith("stage cache ") and src[2:] == ["train"] * 3
    # looking is not using: the entries' last use (their eviction order) is as it was
    assert used and [m.stat().st_mtime_ns for m in manifests] == [10**18] * len(manifests)
    assert count_fits == ["teacher", "distill", "quantize"]  # still only the dq run's

    # without the stage cache, the fine-tuned teacher still comes from the teacher cache
    src = [
        s["source"]
        for s in train(cfg(tmp_path, "dry3", "dry_run=true", "stage_cache.enabled=false"))["stages"]
    ]
    assert src[0].startswith("teacher cache ") and src[1:] == ["train"] * 4
    # a run that dry_run left out changes nothing a real run would do: the real dpq run reuses the prefix
    train(cfg(tmp_path, "dpq"))
    assert count_fits == ["teacher", "distill", "quantize", "prune", "recover", "quantize"]


def test_in_a_multirun_a_dry_run_counts_what_the_earlier_jobs_would_have_cached(
    tmp_path, monkeypatch, capsys
):
    """Hydra's basic launcher runs a grid's jobs one after another: a final-sparsity grid trains the teacher and
    the distillation once. Outside a multirun (a single run, these tests' calls) nothing is remembered."""
    import dpq.run.plan as plan

    first = train(cfg(tmp_path, "a", "dry_run=true"))
    again = train(cfg(tmp_path, "b", "dry_run=true", "pipeline.stages.prune.final_sparsity=0.7"))
    assert [s["source"] for s in first["stages"]] == [s["source"] for s in again["stages"]] == ["train"] * 5

    monkeypatch.setattr(plan, "_in_multirun", lambda: True)
    plan.DryRunSummary().on_multirun_start(None)
    train(cfg(tmp_path, "c", "dry_run=true"))
    second = [
        s["source"]
        for s in train(cfg(tmp_path, "d", "dry_run=true", "pipeline.stages.prune.final_sparsity=0.7"))[
            "stages"
        ]
    ]
    assert second[0] == second[1] and second[0].endswith("(an earlier job trains it)")
    assert second[2:] == ["train"] * 3
    third = [s["source"] for s in train(cfg(tmp_path, "e", "dry_run=true", "pipeline=dq"))["stages"]]
    assert third[:2] == second[:2] and third[2] == "train"  # dq's quantize follows distill: a new prefix
    capsys.readouterr()
    plan.DryRunSummary().on_multirun_end({"dry_run": True})
    assert capsys.readouterr().out.strip() == (
        "dpq dry run of 3 jobs: 9 stages would train; the stage cache would serve 4 (4 after an earlier job of "
        "this multirun), the teacher cache 0; 0 need no training"
    )


def test_a_dry_run_loads_no_model_and_stops_at_bad_data_as_a_run_does(here, nothing_loads):
    bad_case(here, "missing column")  # the data files, and task "bad" naming a column they lack
    conf_file(here, "task", "good", task_yaml("good", GOOD, COLUMNS))
    dry = train(compose(here, "task=good", "trainer=debug", "dry_run=true"))
    assert [s["source"] for s in dry["stages"]] == ["train"] * 5
    assert dry["data"]["sizes"]["train"] == 30
    with pytest.raises(ConfigError, match="task.text_column='question': .*not a column of"):
        train(compose(here, "task=bad", "trainer=debug", "dry_run=true"))


def test_dry_run_is_bookkeeping():
    """A dry run never writes results.json; the key must not split real runs' configurations or caches."""
    from dpq.core.config import BOOKKEEPING_KEYS

    assert "dry_run" in BOOKKEEPING_KEYS


def test_a_dry_run_of_a_resume_is_refused_rather_than_resuming(tmp_path):
    with pytest.raises(ConfigError, match="dry_run=True: cannot be combined with resume="):
        train(cfg(tmp_path, "dry", "dry_run=true", f"resume={tmp_path / 'old'}"))


def test_under_ddp_a_dry_run_counts_each_processs_steps(tmp_path):
    dry = train(cfg(tmp_path, "dry", "dry_run=true", "trainer=ddp_cpu", "task.batch_size=24"))
    # 256 examples: 11 batches of 24; each of 2 processes takes 128 of them: 6 steps (5.33 batches) per epoch
    assert dry["data"]["processes"] == 2
    assert dry["data"]["batches_per_epoch"] == 11 and dry["data"]["steps_per_epoch"] == 6


def test_the_steps_per_epoch_follow_the_trainers_limits_as_lightning_counts_them():
    from dpq.run.plan import steps_per_epoch

    assert steps_per_epoch(256, 32, 1, {}) == 8
    assert steps_per_epoch(256, 32, 1, {"limit_train_batches": 4}) == 4
    assert steps_per_epoch(256, 32, 1, {"limit_train_batches": 0.3}) == 2  # int(8 * 0.3)
    assert steps_per_epoch(256, 32, 1, {"limit_train_batches": 1.0, "accumulate_grad_batches": 3}) == 3
    assert steps_per_epoch(256, 24, 2, {}) == 6  # 128 examples per process
    from dpq.run.plan import used_batches

    assert used_batches(256, 32, 1, {"limit_train_batches": 0.3, "accumulate_grad_batches": 2}) == 2


@pytest.mark.parametrize(
    "override, said",
    [
        ("trainer.limit_train_batches=0", "no training batch (the split has 8 per epoch: 256 examples, "),
        ("trainer.limit_train_batches=0.1", "use at least 0.125, or 1.0 for all"),  # int(8 * 0.1) = 0
        ("trainer.limit_val_batches=0", "no validation batch (the split has 1 per epoch: 64 examples, "),
        ("trainer.limit_test_batches=0.5", "trainer.limit_test_batches=0.5: leaves no test batch"),
        ("trainer.limit_test_batches=1", None),
        ("trainer.limit_train_batches=0.125", None),  # one batch of 8
    ],
)
def test_a_batch_limit_that_leaves_a_split_no_batch_is_a_config_error_before_anything_loads(
    tmp_path, nothing_loads, override, said
):
    """Lightning takes 0 batches as "skip": with no training batch a run finished with every stage untrained
    (its prune stage at sparsity 0), and with no validation or test batch it failed after the teacher's
    training (an IndexError). Each is now a config error naming the key, the split's batches and the least
    value that leaves one."""
    c = cfg(tmp_path, "dry", "dry_run=true", override)
    if said is None:
        assert train(c)["dry_run"]
        return
    with pytest.raises(ConfigError, match=re.escape(said)):
        train(c)
    with pytest.raises(ConfigError, match=re.escape(said)):
        train(cfg(tmp_path, "real", override))  # a real run stops at the same check


@pytest.mark.parametrize(
    "overrides, said",
    [
        (["pipeline.stages.prune.update_every=10"], "pipeline.stages.prune: masks are recomputed every"),
        (
            ["pipeline=spiral", "pipeline.stages.spiral.prune.update_every=4"],
            "pipeline.stages.spiral.prune (every round): masks",
        ),
        (["pipeline.stages.prune.update_every=10", "pipeline.stages.prune.schedule=one_shot"], None),
        ([], None),  # experiment=tiny's update_every=2: updates at 2, 4, 6 of 8 steps
    ],
)
def test_a_dry_run_says_which_prune_ramps_update_every_turns_into_one_jump(tmp_path, caplog, overrides, said):
    """Said before anything trains, from the plan's steps per epoch (tiny: 4 per epoch, 8 per prune stage,
    4 per spiral round), as the stage would say it when it starts."""
    with caplog.at_level("WARNING", logger="dpq.run.plan"):
        train(cfg(tmp_path, "dry", "dry_run=true", *overrides))
    text = " ".join(r.getMessage() for r in caplog.records if "update_every" in r.getMessage())
    assert (said in text and "one jump" in text) if said else not text, text


def test_epochs_0_with_max_steps_trains_max_steps_and_the_plan_says_which_ends_a_stage(tmp_path, monkeypatch):
    """``epochs: 0`` with ``max_steps > 0`` is accepted as "train max_steps" (StageConfig.check), yet
    Lightning's max_epochs=0 stopped the fit before its first step; and the plan printed max_steps where
    the epochs end a stage first."""
    from dpq.run.context import RunContext

    steps = {}
    real = RunContext.fit

    def recording(self, state, model, stage, *a, **k):
        out = real(self, state, model, stage, *a, **k)
        steps[stage.name] = state.fit_steps[stage.name]
        return out

    monkeypatch.setattr(RunContext, "fit", recording)
    P = "pipeline.stages"
    over = ["pipeline=dp", f"{P}.prune.epochs=0", f"+{P}.prune.max_steps=6", f"+{P}.recover.max_steps=100"]
    dry = train(cfg(tmp_path, "dry", "dry_run=true", *over))
    lengths = {s["stage"]: s["length"] for s in dry["stages"]}
    assert lengths["prune"] == "6 steps"
    assert lengths["recover"] == "4 steps (1 epoch ends before max_steps=100)", lengths
    train(cfg(tmp_path, "run", *over))
    assert steps["prune"] == 6 and steps["recover"] == int(lengths["recover"].split()[0])
