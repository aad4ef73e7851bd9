"""Spiral compression: alternating prune and distill rounds, each round's model teaching the next."""

import json
import logging

import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from dpq.core.errors import ConfigError
from dpq.run.validate import validate
from dpq.stages.spiral import SpiralConfig
from dpq.train import train


def test_spiral_three_rounds_raise_sparsity_monotonically_and_list_rounds(make_cfg, tmp_path):
    cfg = make_cfg("experiment=tiny", "pipeline=spiral", "cost.repeats=1", "cost.warmup=0")
    results = train(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    rounds = on_disk["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    sparsities = [r["metrics"]["sparsity"] for r in rounds]
    assert sparsities == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=1e-3)
    assert all(b > a for a, b in zip(sparsities, sparsities[1:]))
    names = [s["stage"] for s in results["stages"]]
    assert names == [
        "teacher",
        "distill",
        "spiral.r0.prune",
        "spiral.r0.distill",
        "spiral.r1.prune",
        "spiral.r1.distill",
        "spiral.r2.prune",
        "spiral.r2.distill",
        "quantize",
    ]
    assert results["final"]["quantized"] and results["final"]["sparsity"] >= 0.5 - 1e-3


@pytest.mark.parametrize("mode", ["original", "both"])
def test_spiral_teacher_modes_run(make_cfg, mode):
    cfg = make_cfg(
        "experiment=tiny",
        "pipeline=spiral",
        f"pipeline.stages.spiral.teacher_mode={mode}",
        "pipeline.stages.spiral.rounds=2",
        "pipeline.order=[teacher,distill,spiral]",
        "cost.repeats=1",
        "cost.warmup=0",
        "save_model=false",
    )
    results = train(cfg)
    assert [r["round"] for r in results["rounds"]] == [0, 1]
    assert all(r["teacher_mode"] == mode for r in results["rounds"])


def test_round_targets_default_to_a_linear_ramp():
    assert SpiralConfig(rounds=3, final_sparsity=0.6).targets() == pytest.approx([0.2, 0.4, 0.6])


def test_rounds_train_with_the_settings_as_checked_and_null_means_the_spirals_own():
    """The check converted "2" and "1e-4" and threw the result away: the rounds got the strings. A null
    block gave the stand-alone stages' defaults, not the spiral's shorter rounds."""
    from dpq.stages.spiral import SpiralStage

    raw = {
        "epochs": "2",
        "lr": "1e-4",
        "update_every": 10,
        "ramp_end": 0.75,
        "alpha": 0.5,
        "temperature": 2.0,
    }
    spiral = SpiralStage.from_config(
        "spiral", {"kind": "spiral", "rounds": 2, "final_sparsity": 0.5, "prune": raw}
    )
    prune, _ = spiral.round_stages(0, 0.0, 0.25)
    assert prune.cfg.epochs == 2 and isinstance(prune.cfg.epochs, int) and prune.cfg.lr == pytest.approx(1e-4)
    spiral = SpiralStage.from_config(
        "spiral", {"kind": "spiral", "rounds": 2, "final_sparsity": 0.5, "prune": None, "distill": None}
    )
    assert spiral.cfg.prune == SpiralConfig().prune and spiral.cfg.distill == SpiralConfig().distill


@pytest.mark.parametrize(
    "override, key",
    [
        ("pipeline.stages.spiral.round_targets=[0.4,0.2,0.5]", "pipeline.stages.spiral.round_targets"),
        ("pipeline.stages.spiral.teacher_mode=newest", "pipeline.stages.spiral.teacher_mode"),
        ("+pipeline.stages.spiral.prune.final_sparsity=0.9", "pipeline.stages.spiral.prune.final_sparsity"),
        ("+pipeline.stages.spiral.distill.epoch=2", "pipeline.stages.spiral.distill.epoch"),
        ("pipeline.stages.spiral.rounds=0", "pipeline.stages.spiral.rounds"),
        # the run is labelled by final_sparsity: rounds ending elsewhere were mislabelled
        ("pipeline.stages.spiral.round_targets=[0.2,0.4,0.6]", "pipeline.stages.spiral.round_targets"),
    ],
)
def test_bad_spiral_configs(make_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        train(make_cfg("experiment=tiny", "pipeline=spiral", override))
    assert err.value.key == key


def test_structured_spiral_rounds_keep_going_once_a_layer_is_down_to_min_keep(make_cfg):
    """tiny_bert has 2 heads per layer: after the first rounds a layer holds min_keep=1 head, and the
    next round's prune must simply leave it (it raised a config error mid-run before)."""
    results = train(
        make_cfg(
            "experiment=tiny",
            "pipeline=spiral",
            "pipeline.stages.prune.final_sparsity=0.67",
            "pipeline.stages.prune.granularity=heads+neurons",  # the rounds follow the prune stage
            "pipeline.stages.prune.criterion=taylor",
        )
    )
    rounds = [r for r in results["stages"] if r["stage"].endswith(".prune")]
    assert len(rounds) == 3
    heads = rounds[-1]["structure"]["heads"]
    assert heads and all(n == 1 for n in heads.values())  # 2 heads, 67% asked, min_keep 1 left
    assert rounds[-1]["metrics"]["dense_gflops"] < rounds[0]["metrics"]["dense_gflops"]


def test_spiral_rounds_prune_what_and_how_the_prune_stage_prunes(tmp_path):
    """An ordering comparison must prune the same groups by the same criterion: the rounds take
    granularity, criterion, scope (and the rest of "what is removed") from the prune stage unless
    the spiral sets its own; their schedule (epochs, lr) stays the spiral's."""
    spiral = compose_cfg(tmp_path, ["experiment=deploy70", "pipeline=spiral"]).pipeline.stages.spiral
    assert spiral.final_sparsity == 0.7
    assert (spiral.prune.granularity, spiral.prune.criterion) == ("heads+neurons", "taylor")
    assert spiral.prune.epochs == 1  # the round's own length, not the prune stage's 2
    plain = compose_cfg(
        tmp_path,
        ["pipeline=spiral", "pipeline.stages.prune.scope=global", "pipeline.stages.prune.criterion=obs"],
    ).pipeline.stages.spiral.prune
    assert (plain.scope, plain.criterion, plain.granularity) == ("global", "obs", "unstructured")
    own = compose_cfg(
        tmp_path,
        ["experiment=deploy70", "pipeline=spiral", "pipeline.stages.spiral.prune.criterion=magnitude"],
    ).pipeline.stages.spiral.prune
    assert (own.criterion, own.granularity) == ("magnitude", "heads+neurons")  # a spiral setting wins


@pytest.mark.parametrize(
    "overrides, warned",
    [
        (["experiment=far_hn33", "pipeline=spiral"], True),  # FLOPs budget set, only the spiral prunes
        (["experiment=far_hn33", "pipeline=dpq"], False),  # the prune stage takes it
        (["experiment=deploy70", "pipeline=spiral"], False),  # no FLOPs budget
    ],
)
def test_a_flops_target_no_stage_uses_is_said_before_training(tmp_path, caplog, overrides, warned):
    cfg = OmegaConf.to_container(compose_cfg(tmp_path, overrides), resolve=True)
    with caplog.at_level(logging.WARNING, logger="dpq.run.validate"):
        validate(cfg)
    said = [r.getMessage() for r in caplog.records if "flops_target" in r.getMessage()]
    assert bool(said) == warned
    if warned:
        assert "pipeline.stages.prune.flops_target=0.33" in said[0]
        assert "pipeline.stages.spiral.final_sparsity=0.67" in said[0]


def test_both_with_an_ensemble_teacher_averages_its_members_and_the_previous_round():
    """teacher_mode=both when the pipeline's teacher is an ensemble: the round's teacher is one flat
    ensemble (an ensemble of ensembles failed to call its member, after teacher and distill had trained):
    the ensemble's members share half by their weights, the previous round the other half."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from dpq.distill.features import combine_teachers
    from dpq.distill.teachers import EnsembleTeacher, TeacherLogits
    from dpq.stages.spiral import SpiralStage

    class Table(nn.Module):  # a model whose logits are a fixed row per input id
        def __init__(self, seed):
            super().__init__()
            self.register_buffer("rows", torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)))

        def forward(self, ids):
            return self.rows[ids]

    original = EnsembleTeacher([TeacherLogits(Table(0), 4, 3), TeacherLogits(Table(1), 4, 3)], [3.0, 1.0])
    stage = SimpleNamespace(cfg=SimpleNamespace(teacher_mode="both"))
    ctx = SimpleNamespace(data=SimpleNamespace(num_train=4), num_labels=3)
    student = Table(2)
    both = SpiralStage._round_teacher(stage, ctx, student, original)
    ids = torch.arange(4)
    got = both.log_probs({"ids": ids}, ids, 2.0)
    rows = [Table(s).rows for s in (0, 1, 2)]
    assert torch.allclose(got, combine_teachers(rows, [0.375, 0.125, 0.5], 2.0), atol=1e-6)


@pytest.mark.parametrize(
    "overrides, key, said",
    [
        (
            ["pipeline.stages.spiral.teacher_mode=both", "+pipeline.stages.spiral.distill.hidden=1.0"],
            "pipeline.stages.spiral.distill.hidden",
            "teacher_mode=both teaches with an ensemble",
        ),
        (  # the previous round's model teaches: the student's 2 layers, not the teacher's
            ["+pipeline.stages.spiral.distill.hidden=1.0", "+pipeline.stages.spiral.distill.layer_map=[3,3]"],
            "pipeline.stages.spiral.distill.layer_map",
            "layer_map",
        ),
    ],
)
def test_a_spirals_feature_distillation_is_checked_before_the_teacher_trains(
    make_cfg, count_fits, overrides, key, said
):
    """Both failed with a ValueError inside the first round, after the teacher (and round 0's prune) trained."""
    with pytest.raises(ConfigError, match=said) as err:
        train(make_cfg("experiment=tiny", "pipeline=spiral", *overrides))
    assert err.value.key == key and count_fits == []
