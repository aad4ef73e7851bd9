"""The ramp under conditions a plain fit does not show: skipped fp16 steps, resumed masks on another device,
schedule ends that must be exact, and a stage with no finite step count."""

import logging
import types

import pytest
import torch
from torch import nn

from dpq.prune.callbacks import SparsityRamp
from dpq.prune.masks import intersect
from dpq.prune.obs import ObsOptions
from dpq.prune.schedules import make_schedule


def _setup(total_steps=10):
    torch.manual_seed(0)
    model = nn.Module()
    model.a = nn.Linear(8, 4)
    pl = types.SimpleNamespace(model=model)
    trainer = types.SimpleNamespace(
        global_step=0, estimated_stepping_batches=total_steps, is_global_zero=True, loggers=[]
    )
    return model, pl, trainer


def _step(ramp, model, pl, trainer, t, grad):
    """One optimizer step as Lightning hooks it: the gradient in place, on_before_optimizer_step, batch end."""
    model.a.weight.grad = grad
    trainer.global_step = t
    ramp.on_before_optimizer_step(trainer, pl, None)
    trainer.global_step = t + 1
    ramp.on_train_batch_end(trainer, pl, None, None, t)


@pytest.mark.parametrize("criterion", ["taylor", "movement"])
def test_a_step_with_non_finite_gradients_is_left_out_of_the_scores(criterion):
    """fp16: the GradScaler skips a step whose unscaled gradients hold inf/NaN after on_before_optimizer_step
    ran; its gradients must not make scores NaN (a NaN score is never pruned)."""
    model, pl, trainer = _setup()
    ramp = SparsityRamp("p", ["a"], 0.0, 0.5, update_every=5, criterion=criterion)
    ramp.on_train_start(trainer, pl)
    grads = [torch.randn(4, 8) for _ in range(4)]
    bad = grads[1].clone()
    bad[0, :] = float("inf")
    w = model.a.weight.detach().clone()
    for t, g in enumerate([grads[0], bad, grads[2], grads[3]]):
        model.a.weight.grad = g.clone()
        trainer.global_step = t
        ramp.on_before_optimizer_step(trainer, pl, None)
    assert torch.isfinite(ramp.scores["a"]).all()
    wg = sum(w * grads[i] for i in (0, 2, 3))
    want = sum((w * grads[i]).abs() for i in (0, 2, 3)) if criterion == "taylor" else -wg
    torch.testing.assert_close(ramp.scores["a"], want)
    assert ramp.skipped_steps == 1 and ramp.score_steps == 3


def test_a_window_of_only_skipped_steps_is_warned_about_and_ranks_by_magnitude(caplog):
    model, pl, trainer = _setup()
    ramp = SparsityRamp("p", ["a"], 0.0, 0.5, update_every=5, criterion="taylor")
    ramp.on_train_start(trainer, pl)
    caplog.set_level(logging.INFO, logger="dpq.prune.callbacks")
    for t in range(5):
        g = torch.randn(4, 8)
        g[t % 4, 0] = float("nan")
        _step(ramp, model, pl, trainer, t, g)
    said = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING] and "magnitude" in said[0].getMessage()
    assert ramp.masks["a"].sum() > 0 and not torch.isnan(model.a.weight).any()
    assert ramp.skipped_steps == 5


def test_obs_leaves_a_skipped_step_out_of_the_fisher():
    """A non-finite gradient in the Fisher broke the inverse ('non-positive diagonal', a misleading error)."""
    model, pl, trainer = _setup()
    ramp = SparsityRamp(
        "p", ["a"], 0.0, 0.5, update_every=5, criterion="obs", obs=ObsOptions(num_grads=4, block_size=8)
    )
    ramp.on_train_start(trainer, pl)
    for t in range(4):  # steps 1..4 are the 4 before the update at 5
        g = torch.randn(4, 8)
        if t == 2:
            g[1, 3] = -float("inf")
        model.a.weight.grad = g
        trainer.global_step = t
        ramp.on_before_optimizer_step(trainer, pl, None)
    assert ramp._fisher.count == 2
    model.a.weight.grad = torch.randn(4, 8)
    trainer.global_step = 4
    ramp.on_before_optimizer_step(trainer, pl, None)
    trainer.global_step = 5
    ramp.on_train_batch_end(trainer, pl, None, None, 4)  # the OBS update: a finite inverse
    assert ramp.history[-1][0] == 5 and torch.isfinite(model.a.weight).all()
    assert ramp.skipped_steps == 1
    assert int((~ramp.masks["a"]).sum()) == round(ramp.history[-1][1] * 32)


def test_intersect_moves_a_restored_mask_to_the_ramps_device():
    """Masks restored from a snapshot are on the CPU, a ramp's on its weights' device ('meta' stands in for
    a GPU here: `cpu & meta` fails as `cpu & cuda` would)."""
    a = {"x": torch.tensor([True, False, True, True]), "y": torch.tensor([False, True])}
    b = {"x": torch.tensor([True, True, False, True])}
    out = intersect(a, b)
    assert out["x"].tolist() == [True, False, False, True] and out["y"].tolist() == [False, True]
    on_meta = intersect(a, {"x": b["x"].to("meta")})
    assert on_meta["x"].device.type == "meta" and on_meta["x"].shape == (4,)


@pytest.mark.parametrize("k", [1, 3, 4, 7])
@pytest.mark.parametrize("initial, final", [(0.0, 0.8), (0.3, 0.9), (0.1, 0.7)])
def test_the_iterative_schedule_ends_exactly_at_final(k, initial, final):
    s = make_schedule("iterative", iterations=k)
    assert s(1.0, initial, final) == final and s(2.0, initial, final) == final  # not 0.8000000000000002


def test_a_ramp_ending_on_an_update_step_does_not_recompute_at_train_end():
    model, pl, trainer = _setup()
    ramp = SparsityRamp(
        "p", ["a"], 0.0, 0.8, update_every=5, schedule=make_schedule("iterative", iterations=3)
    )
    ramp.on_train_start(trainer, pl)
    for t in range(10):
        _step(ramp, model, pl, trainer, t, torch.randn(4, 8))
    updates = list(ramp.history)
    ramp.on_train_end(trainer, pl)
    assert ramp.history == updates and ramp.history[-1] == (10, 0.8)


def test_an_infinite_step_count_is_the_friendly_error_not_an_overflow():
    model, pl, trainer = _setup()
    trainer.estimated_stepping_batches = float("inf")  # max_epochs=-1 and no max_steps
    ramp = SparsityRamp("p", ["a"], 0.0, 0.5)
    with pytest.raises(ValueError, match="finite number of training steps"):
        ramp.on_train_start(trainer, pl)
