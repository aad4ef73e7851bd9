import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpq.prune.callbacks import MaskFreeze, SparsityRamp
from dpq.prune.masks import apply_masks, magnitude_masks, mask_sparsity

TARGETS = ["hidden.0", "hidden.1"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.ModuleList([nn.Linear(16, 32), nn.Linear(32, 32)])
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        for h in self.hidden:
            x = torch.relu(h(x))
        return self.head(x)


class Module(L.LightningModule):
    def __init__(self, lr=0.05):
        super().__init__()
        self.model, self.lr = Net(), lr

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loader(n=160, bs=8):
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=bs
    )


class Watch(L.Callback):
    """Runs after the mask callbacks: records whether any masked weight was non-zero after a step."""

    def __init__(self, mask_cb):
        self.mask_cb, self.violations, self.steps = mask_cb, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        for n, m in self.mask_cb.masks.items():
            self.violations += int((pl_module.model.get_submodule(n).weight[~m] != 0).sum())


def fit(module, callbacks, epochs=1):
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, loader())
    return trainer


def test_magnitude_masks_prune_the_smallest_weights_per_layer():
    net = Net()
    masks = magnitude_masks(net, TARGETS, 0.25)
    for n in TARGETS:
        w, m = net.get_submodule(n).weight.abs(), masks[n]
        assert (~m).sum() == round(0.25 * w.numel())
        assert w[~m].max() <= w[m].min()


def test_global_scope_uses_one_threshold():
    net = Net()
    with torch.no_grad():
        w = net.hidden[1].weight
        w.copy_(
            w.sign() * (w.abs() + 1.0)
        )  # layer 1 all larger than layer 0: global pruning should hit layer 0 first
    masks = magnitude_masks(net, TARGETS, 0.3, scope="global")
    assert mask_sparsity(masks) == pytest.approx(0.3, abs=1e-3)
    assert (~masks["hidden.1"]).sum() == 0


def test_global_scope_warns_once_when_it_empties_a_layer(caplog):
    net = Net()
    with torch.no_grad():  # layer 1 all larger: a global 40% takes all 512 weights of layer 0 (40% of 1536)
        net.hidden[1].weight.copy_(net.hidden[1].weight.sign() * (net.hidden[1].weight.abs() + 1.0))
    with caplog.at_level("WARNING", logger="dpq.prune.masks"):
        m1 = magnitude_masks(net, TARGETS, 0.2, scope="global")
        assert not caplog.records  # 20% leaves layer 0 some weights
        m2 = magnitude_masks(net, TARGETS, 1 / 3, previous=m1, scope="global")
        assert not m2["hidden.0"].any()
        assert [r.getMessage() for r in caplog.records if "hidden.0" in r.getMessage()]
        caplog.clear()
        magnitude_masks(net, TARGETS, 0.5, previous=m2, scope="global")
        assert not caplog.records  # already empty: said once


def test_masks_only_grow_sparser():
    net = Net()
    m1 = magnitude_masks(net, TARGETS, 0.3)
    apply_masks(net, m1)
    with torch.no_grad():  # perturb so a fresh ranking would differ
        for n in TARGETS:
            net.get_submodule(n).weight.add_(torch.randn_like(net.get_submodule(n).weight) * 0.01)
    m2 = magnitude_masks(net, TARGETS, 0.5, previous=m1)
    for n in TARGETS:
        assert not (m2[n] & ~m1[n]).any()  # nothing pruned comes back


def test_sparsity_ramp_hits_initial_at_start_final_at_end_and_masks_hold_after_every_step():
    module = Module()
    ramp = SparsityRamp("prune", TARGETS, initial=0.1, final=0.6, exponent=3, update_every=3, ramp_end=0.8)
    watch = Watch(ramp)
    fit(module, [ramp, watch], epochs=2)
    steps, targets = zip(*ramp.history)
    assert steps[0] == 0 and targets[0] == pytest.approx(0.1)
    assert targets[-1] == pytest.approx(0.6)
    assert all(b >= a - 1e-12 for a, b in zip(targets, targets[1:]))
    assert watch.steps == 40 and watch.violations == 0
    for n in TARGETS:
        w = module.model.get_submodule(n).weight
        assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=1e-3)


def test_mask_freeze_keeps_every_pruned_weight_at_zero_during_recovery():
    module = Module(lr=0.1)
    masks = magnitude_masks(module.model, TARGETS, 0.5)
    apply_masks(module.model, masks)
    freeze = MaskFreeze("recover", masks)
    watch = Watch(freeze)
    before = {n: module.model.get_submodule(n).weight.detach().clone() for n in TARGETS}
    fit(module, [freeze, watch])
    assert watch.violations == 0
    for n in TARGETS:
        w = module.model.get_submodule(n).weight
        assert torch.equal(w == 0, ~masks[n])  # same zeros, no more, no fewer
        assert not torch.equal(w, before[n])  # and the kept weights did train


def test_two_prune_stages_have_distinct_state_and_round_trip():
    a = SparsityRamp("prune_a", TARGETS, 0.0, 0.5)
    b = SparsityRamp("prune_b", TARGETS, 0.0, 0.7)
    assert a.state_key != b.state_key
    net = Net()
    a.masks = magnitude_masks(net, TARGETS, 0.5)
    a.total_steps, a.history = 10, [(0, 0.0), (10, 0.5)]
    c = SparsityRamp("prune_a", TARGETS, 0.0, 0.5)
    c.load_state_dict(a.state_dict())
    assert c.total_steps == 10 and c.history == a.history
    assert all(torch.equal(c.masks[n], a.masks[n]) for n in TARGETS)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.9])
def test_global_allocation_reaches_the_overall_target_exactly(sparsity):
    """scope=global ranks every weight of every layer together: exactly round(s * N) pruned overall, with
    ties, a previous mask, and layers of different sizes ending at different sparsities."""
    from dpq.prune.masks import score_masks

    g = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.randn(64, 32, generator=g).abs(),
        "b": torch.randn(32, 64, generator=g).abs() * 3,  # larger scores: pruned less
        "c": torch.randint(0, 3, (16, 48), generator=g).float(),  # many ties
    }
    previous = {n: torch.rand(s.shape, generator=g) > 0.2 for n, s in scores.items()}
    masks = score_masks(scores, sparsity, previous=previous, scope="global")
    n = sum(s.numel() for s in scores.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    floor = sum(int((~p).sum()) for p in previous.values())
    assert pruned == max(round(sparsity * n), floor)
    assert all(bool((~previous[k] <= ~masks[k]).all()) for k in masks)  # pruned weights stay pruned
    if sparsity >= 0.5:
        per_layer = {k: float((~m).float().mean()) for k, m in masks.items()}
        assert per_layer["a"] > per_layer["b"] + 0.2  # allocation is not uniform


@pytest.mark.parametrize(
    "update_every, ramp_end, schedule, said",
    [
        (25, 0.75, "polynomial", "one jump at step 15; update_every=3"),  # at the ramp's end, trained after
        (25, 1.0, "polynomial", "one jump at step 20, its last, with no training after; update_every=5"),
        (5, 0.25, "polynomial", "one jump at step 5; update_every=1 would update them 5 times"),
        (5, 0.25, "iterative", "one jump at step 5;"),  # its 3 jumps coalesce into one
        (3, 0.75, "polynomial", None),  # updates at 3, 6, ..., 15: gradual
        (25, 0.75, "one_shot", None),  # one jump at step 0 is the schedule
    ],
)
def test_a_ramp_its_update_every_turns_into_one_jump_is_warned_about(
    update_every, ramp_end, schedule, said, caplog
):
    """update_every at or past the ramp's end leaves one mask update on the ramp: nothing fails and the
    run reads as gradual pruning, so the stage says so as it starts (20 optimizer steps here)."""
    from dpq.prune.schedules import make_schedule

    ramp = SparsityRamp(
        "prune",
        TARGETS,
        0.0,
        0.5,
        update_every=update_every,
        ramp_end=ramp_end,
        schedule=make_schedule(schedule),
    )
    with caplog.at_level("WARNING", logger="dpq.prune.callbacks"):
        fit(Module(), [ramp])
    assert ramp.total_steps == 20
    text = " ".join(r.getMessage() for r in caplog.records if "update_every" in r.getMessage())
    assert (said in text) if said else not text, text
    if said and schedule == "polynomial":
        assert [t for _, t in ramp.history][:2] == [0.0, 0.5]  # from nothing to the target in one update


@pytest.mark.parametrize("accumulate", [1, 4])
def test_final_sparsity_holds_from_ramp_end_and_each_update_runs_once_per_optimizer_step(accumulate):
    """ramp_end=0.75 of 20 steps is step 15, not a multiple of update_every=4: the final target waited for
    step 16. Under gradient accumulation the hook runs per micro-batch: each update ran (and was counted)
    once per micro-batch of its step."""
    from dpq.prune.schedules import make_schedule

    ramp = SparsityRamp(
        "prune", TARGETS, 0.0, 0.5, update_every=4, ramp_end=0.75, schedule=make_schedule("linear")
    )
    seen = {}

    class Sparsity(L.Callback):  # after the ramp's own hook: the masks the next step trains with
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            w = [pl_module.model.hidden[i].weight for i in range(2)]
            seen[trainer.global_step] = float(sum((x == 0).sum() for x in w) / sum(x.numel() for x in w))

    trainer = L.Trainer(
        max_steps=20,
        accumulate_grad_batches=accumulate,
        callbacks=[ramp, Sparsity()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Module(), loader(n=20 * 8 * accumulate))
    steps = [t for t, _ in ramp.history]
    assert steps == [0, 4, 8, 12, 15, 16, 20] and len(set(steps)) == len(steps)
    assert seen[14] < 0.5 - 0.05 and seen[15] == pytest.approx(0.5, abs=1e-3)


def test_obs_ranks_the_update_at_the_ramps_end_by_saliency_not_magnitude():
    """ramp_end=0.65 of 20 steps is step 13, no multiple of update_every=4: its gradient window never
    opened, so the update that reaches the final target (with iterative, the whole last third) fell back
    to magnitude with no OBS compensation."""
    from dpq.prune.obs import ObsOptions
    from dpq.prune.schedules import make_schedule

    ramp = SparsityRamp(
        "prune",
        TARGETS,
        0.0,
        0.6,
        update_every=4,
        ramp_end=0.65,
        criterion="obs",
        schedule=make_schedule("iterative", iterations=3),
        obs=ObsOptions(block_size=8, num_grads=2, damp_ratio=1e-2),
    )
    by_obs, recompute = [], ramp._recompute

    def spy(model, step):
        by_obs.append((step, ramp._fisher is not None and ramp._fisher.count > 0))
        recompute(model, step)

    ramp._recompute = spy
    fit(Module(lr=0.0), [ramp])
    assert [s for s, _ in by_obs] == [0, 4, 8, 12, 13, 16, 20]
    assert all(obs for s, obs in by_obs if s > 0), by_obs  # step 0 has no gradient yet: magnitude, by design


def test_the_ramps_end_step_is_not_moved_by_float_error():
    """0.55 * 100 is 55.00000000000001 in floats: its ceiling put the final target at step 56, not 55."""
    from dpq.prune.schedules import ramp_progress

    ramp = SparsityRamp("prune", TARGETS, 0.0, 0.5, update_every=10, ramp_end=0.55)
    ramp.total_steps = 100
    assert ramp._ramp_end_step() == 55 and ramp_progress(55, 100, 0.55) == 1.0
    assert ramp.target_at(55) == 0.5 and ramp.target_at(54) < 0.5


def test_a_ramp_too_short_for_two_updates_is_told_to_lengthen_the_stage_not_to_update_once():
    """A 2-step stage (ramp_end 0.75: 1.5 steps) cannot ramp gradually at any update_every; the warning said
    "update_every=1 would update them 1 times" -- a fix that fixes nothing."""
    from dpq.prune.callbacks import one_jump

    said = one_jump(2, 2, 0.75)
    assert "one jump at step 2, its last" in said and "lengthen the stage" in said and "1 times" not in said
    assert "update_every=1 would update them 3 times" in one_jump(4, 4, 0.75)  # ramp of 3 steps
