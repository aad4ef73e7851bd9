"""Tests of obs.py against independent dense float64 computations.

Run: /work/main/.venv/bin/python -m pytest -q /work/scratch/obs
"""

from __future__ import annotations

import math

import pytest
import torch

from dpq.prune.obs import (
    BlockFisherInverse,
    obert_prune,
    obs_saliency,
    obs_update,
    select_masks,
    suggest_damp,
)

D64 = torch.float64
SHAPES = {"a": (6, 8), "b": (5, 3)}  # 48 weights; 15 weights -> padded last block for B=4 and B=8


# --------------------------------------------------------------------------- helpers
def make_grads(shapes, m, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [
        {n: scale * torch.randn(s, generator=gen, dtype=D64) for n, s in shapes.items()} for _ in range(m)
    ]


def make_weights(shapes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen, dtype=D64) for n, s in shapes.items()}


def build(shapes, grads, B, damp, m=None, dtype=D64, masks=None):
    finv = BlockFisherInverse(shapes, num_grads=m or len(grads), block_size=B, damp=damp, dtype=dtype)
    for g in grads:
        finv.add_gradient(g, masks)
    return finv


def dense_fisher(name, numel, grads, B, damp, m, masks=None):
    """Full (numel x numel) block-diagonal Fisher, built directly from its definition (no padding:
    the last, short block is simply smaller)."""
    G = torch.stack(
        [(g[name] * (masks[name].to(D64) if masks else 1.0)).reshape(-1) for g in grads]
    )  # [k, numel]
    blocks = []
    for start in range(0, numel, B):
        Gb = G[:, start : start + B]
        blocks.append(damp * torch.eye(Gb.shape[1], dtype=D64) + Gb.T @ Gb / m)
    return torch.block_diag(*blocks)


def dense_inverse(name, numel, grads, B, damp, m, masks=None):
    return torch.linalg.inv(dense_fisher(name, numel, grads, B, damp, m, masks))


def block_ranges(numel, B):
    return [list(range(s, min(s + B, numel))) for s in range(0, numel, B)]


def dense_obs(w, Finv_full, pruned, B):
    """Reference OBS update per block: dw = -Finv[:, S] solve(Finv[S,S], w_S); returns new flat w."""
    w = w.reshape(-1).clone()
    p = pruned.reshape(-1)
    out = w.clone()
    for idx in block_ranges(w.numel(), B):
        idx = torch.tensor(idx)
        Fi = Finv_full[idx][:, idx]
        S = torch.nonzero(p[idx]).flatten()
        if S.numel() == 0:
            continue
        dw = -Fi[:, S] @ torch.linalg.solve(Fi[S][:, S], w[idx][S])
        out[idx] = w[idx] + dw
    return out


# ------------------------------------------------------------------ (a) Woodbury inverse
@pytest.mark.parametrize("B", [4, 8])
@pytest.mark.parametrize("damp", [1e-2, 1.0])
def test_woodbury_equals_dense_inverse(B, damp):
    m = 20
    grads = make_grads(SHAPES, m)
    finv = build(SHAPES, grads, B, damp)
    assert finv.complete
    for n, s in SHAPES.items():
        numel = math.prod(s)
        ref = dense_inverse(n, numel, grads, B, damp, m)
        # reassemble our blocks into the full matrix (drop padding rows/cols)
        ours = torch.block_diag(*finv.finv[n])[:numel, :numel]
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-8)
        torch.testing.assert_close(finv.diag()[n], torch.diagonal(ref).view(s), rtol=0, atol=1e-8)
        # padding is decoupled: its rows are e_i/damp
        pad = finv.num_blocks[n] * B - numel
        if pad:
            last = finv.finv[n][-1]
            torch.testing.assert_close(
                last[B - pad :, B - pad :], torch.eye(pad, dtype=D64) / damp, rtol=0, atol=1e-12
            )
            assert float(last[: B - pad, B - pad :].abs().max()) == 0.0


def test_woodbury_rank_deficient_relative():
    """m < B: directions outside the gradients' span keep eigenvalue damp (F^-1 ~ 1/damp)."""
    B, m, damp = 8, 3, 1e-4
    grads = make_grads(SHAPES, m, seed=5)
    finv = build(SHAPES, grads, B, damp)
    for n, s in SHAPES.items():
        ref = dense_inverse(n, math.prod(s), grads, B, damp, m)
        ours = torch.block_diag(*finv.finv[n])[: ref.shape[0], : ref.shape[0]]
        assert float((ours - ref).abs().max()) <= 1e-8 * float(ref.abs().max())


def test_woodbury_check_is_sensitive():
    """Negative control: the 1/m weight matters at the 1e-8 tolerance (m off by one fails)."""
    grads = make_grads(SHAPES, 20)
    finv = build(SHAPES, grads, 8, 1e-2, m=21)
    for _ in range(1):
        finv.add_gradient(make_grads(SHAPES, 1, seed=9)[0])
    ref = dense_inverse("a", 48, grads, 8, 1e-2, 20)
    assert float((torch.block_diag(*finv.finv["a"]) - ref).abs().max()) > 1e-3


def test_add_gradient_limits_and_reset():
    grads = make_grads(SHAPES, 3)
    finv = build(SHAPES, grads, 4, 0.5)
    with pytest.raises(RuntimeError):
        finv.add_gradient(grads[0])
    with pytest.raises(KeyError):
        BlockFisherInverse(SHAPES, 2, 4, 0.5, D64).add_gradient({"a": grads[0]["a"]})
    with pytest.raises(ValueError):
        BlockFisherInverse(SHAPES, 2, 4, 0.5, D64).add_gradient({"a": torch.zeros(8, 6), "b": grads[0]["b"]})
    finv.reset()
    assert finv.count == 0
    for n in SHAPES:
        torch.testing.assert_close(finv.finv[n], torch.eye(4, dtype=D64).expand_as(finv.finv[n]) / 0.5)


def test_masked_gradients():
    """add_gradient(masks=...) == dense Fisher of the masked gradients; pruned rows decouple."""
    grads = make_grads(SHAPES, 10)
    gen = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(s, generator=gen) > 0.3 for n, s in SHAPES.items()}
    finv = build(SHAPES, grads, 8, 1e-2, masks=masks)
    for n, s in SHAPES.items():
        ref = dense_inverse(n, math.prod(s), grads, 8, 1e-2, 10, masks)
        torch.testing.assert_close(
            torch.block_diag(*finv.finv[n])[: ref.shape[0], : ref.shape[0]], ref, rtol=0, atol=1e-8
        )
        assert torch.allclose(finv.diag()[n][~masks[n]], torch.tensor(1 / 1e-2, dtype=D64))


def test_memory_numbers():
    assert (
        BlockFisherInverse.memory_estimate(5_300_000, 50, torch.float32) == 106_000 * 50 * 50 * 4
    )  # 1.06 GB
    assert (
        BlockFisherInverse.memory_estimate(5_300_000, 32, torch.float32)
        == math.ceil(5_300_000 / 32) * 32 * 32 * 4
    )
    f = BlockFisherInverse(SHAPES, 1, 8, 1.0, torch.float32)
    assert f.memory_bytes == (6 + 2) * 8 * 8 * 4


# ------------------------------------------------------------------ (b) saliency / selection
@pytest.mark.parametrize("B", [4, 8])
def test_saliency_and_selection_match_dense(B):
    m, damp = 20, 1e-2
    grads = make_grads(SHAPES, m)
    w = make_weights(SHAPES)
    finv = build(SHAPES, grads, B, damp)
    scores = obs_saliency(w, finv)
    ref = {}
    for n, s in SHAPES.items():
        d = torch.diagonal(dense_inverse(n, math.prod(s), grads, B, damp, m)).view(s)
        ref[n] = w[n] ** 2 / (2 * d)
        torch.testing.assert_close(scores[n], ref[n], rtol=1e-10, atol=0)
    # per layer: exactly the k smallest reference saliencies
    for sp in (0.1, 0.4, 0.75):
        masks = select_masks(scores, sp, scope="layer")
        for n in SHAPES:
            k = round(sp * ref[n].numel())
            expect = set(torch.argsort(ref[n].flatten())[:k].tolist())
            got = set(torch.nonzero(~masks[n].flatten()).flatten().tolist())
            assert got == expect
    # global: the k smallest over the concatenation
    flat = torch.cat([ref[n].flatten() for n in SHAPES])
    masks = select_masks(scores, 0.4, scope="global")
    got = torch.cat([~masks[n].flatten() for n in SHAPES])
    expect = torch.zeros_like(got)
    expect[torch.argsort(flat)[: round(0.4 * flat.numel())]] = True
    assert torch.equal(got, expect)


def test_saliency_differs_from_magnitude():
    """Sanity that the test above can fail: the curvature changes the ranking vs |w|."""
    grads = make_grads(SHAPES, 20, scale=1.0)
    for g in grads:  # very different curvature per weight
        g["a"] = g["a"] * torch.linspace(0.01, 10, 48, dtype=D64).view(6, 8)
    w = make_weights(SHAPES)
    finv = build(SHAPES, grads, 8, 1e-2)
    m1 = select_masks(obs_saliency(w, finv), 0.5)["a"]
    m2 = select_masks({"a": w["a"].abs()}, 0.5)["a"]
    assert not torch.equal(m1, m2)


def test_ties_are_deterministic_by_position():
    scores = {"a": torch.ones(4, 5), "b": torch.ones(3, 3)}
    m = select_masks(scores, 0.3, scope="global")
    flat = torch.cat([~m["a"].flatten(), ~m["b"].flatten()])
    k = round(0.3 * 29)
    assert int(flat.sum()) == k and bool(flat[:k].all())
    m = select_masks(scores, 0.5, scope="layer")
    assert bool((~m["a"].flatten()[:10]).all()) and int((~m["a"]).sum()) == 10


# ------------------------------------------------------------------ (c) OBS update
def _random_mask(shapes, frac, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=gen) >= frac for n, s in shapes.items()}


@pytest.mark.parametrize("B", [4, 8])
def test_update_matches_dense_obs(B):
    m, damp = 20, 1e-2
    grads = make_grads(SHAPES, m)
    w0 = make_weights(SHAPES)
    finv = build(SHAPES, grads, B, damp)
    masks = select_masks(obs_saliency(w0, finv), 0.5)
    w = {n: t.clone() for n, t in w0.items()}
    losses = obs_update(w, finv, masks)
    for n, s in SHAPES.items():
        numel = math.prod(s)
        Finv_full = dense_inverse(n, numel, grads, B, damp, m)
        Fd = dense_fisher(n, numel, grads, B, damp, m)
        ref = dense_obs(w0[n], Finv_full, ~masks[n], B).view(s)
        pr = ~masks[n]
        assert bool((w[n][pr] == 0.0).all())  # exact zeros
        assert float(ref[pr].abs().max()) < 1e-8  # the formula itself removes them
        torch.testing.assert_close(w[n], torch.where(pr, torch.zeros_like(ref), ref), rtol=0, atol=1e-8)
        assert not torch.allclose(w[n][~pr], w0[n][~pr])  # the remaining weights did move
        dw = (w[n] - w0[n]).flatten()
        assert abs(0.5 * float(dw @ Fd @ dw) - losses[n]) <= 1e-8 * max(1.0, losses[n])


@pytest.mark.parametrize("B", [4, 8])
def test_single_removal_loss_equals_saliency(B):
    """One weight pruned per block: 0.5 dw^T F dw == sum of w_q^2 / (2 [F^-1]_qq) (dense)."""
    m, damp = 20, 1e-2
    grads = make_grads(SHAPES, m, seed=11)
    w0 = make_weights(SHAPES, seed=12)
    finv = build(SHAPES, grads, B, damp)
    sal = obs_saliency(w0, finv)
    masks = {}
    for n, s in SHAPES.items():
        keep = torch.ones(math.prod(s), dtype=torch.bool)
        for idx in block_ranges(math.prod(s), B):
            keep[idx[int(torch.argmin(sal[n].flatten()[idx]))]] = False
        masks[n] = keep.view(s)
    w = {n: t.clone() for n, t in w0.items()}
    losses = obs_update(w, finv, masks)
    for n, s in SHAPES.items():
        numel = math.prod(s)
        Fd = dense_fisher(n, numel, grads, B, damp, m)
        d = torch.diagonal(torch.linalg.inv(Fd))
        pr = ~masks[n].flatten()
        predicted = float((w0[n].flatten()[pr] ** 2 / (2 * d[pr])).sum())
        dw = (w[n] - w0[n]).flatten()
        assert abs(0.5 * float(dw @ Fd @ dw) - predicted) <= 1e-9 * predicted
        assert abs(losses[n] - predicted) <= 1e-9 * predicted
        assert int(pr.sum()) == len(block_ranges(numel, B))


def test_obs_beats_approximations():
    """The exact block OBS update has the smallest quadratic loss; 'none' just zeroes."""
    m, damp, B = 20, 1e-2, 8
    grads = make_grads(SHAPES, m, seed=21)
    w0 = make_weights(SHAPES, seed=22)
    finv = build(SHAPES, grads, B, damp)
    masks = select_masks(obs_saliency(w0, finv), 0.5)
    res = {}
    for method in ("obs", "independent", "none"):
        w = {n: t.clone() for n, t in w0.items()}
        losses = obs_update(w, finv, masks, method=method)
        for n, s in SHAPES.items():
            Fd = dense_fisher(n, math.prod(s), grads, B, damp, m)
            dw = (w[n] - w0[n]).flatten()
            assert abs(0.5 * float(dw @ Fd @ dw) - losses[n]) <= 1e-8 * max(1.0, losses[n]), method
            assert bool((w[n][~masks[n]] == 0).all())
        res[method] = (sum(losses.values()), w)
    assert res["obs"][0] < res["independent"][0] and res["obs"][0] < res["none"][0]
    for n in SHAPES:
        torch.testing.assert_close(res["none"][1][n], w0[n] * masks[n])


def test_update_with_previous_mask():
    m, damp, B = 20, 1e-2, 8
    grads = make_grads(SHAPES, m, seed=31)
    prev = _random_mask(SHAPES, 0.25, seed=32)
    w0 = {n: t * prev[n] for n, t in make_weights(SHAPES, seed=33).items()}  # previously pruned are 0
    # (1) masked gradients: S = all pruned vs S = newly pruned give the same update
    finv = build(SHAPES, grads, B, damp, masks=prev)
    masks = select_masks(obs_saliency(w0, finv), 0.6, previous=prev)
    wa = {n: t.clone() for n, t in w0.items()}
    wb = {n: t.clone() for n, t in w0.items()}
    obs_update(wa, finv, masks, previous=prev, constrain_previous=True)
    obs_update(wb, finv, masks, previous=prev, constrain_previous=False)
    for n in SHAPES:
        torch.testing.assert_close(wa[n], wb[n], rtol=0, atol=1e-10)
    # (2) unmasked gradients: constraining all pruned keeps old zeros and matches the dense formula
    finv = build(SHAPES, grads, B, damp)
    masks = select_masks(obs_saliency(w0, finv), 0.6, previous=prev)
    w = {n: t.clone() for n, t in w0.items()}
    obs_update(w, finv, masks, previous=prev)
    for n, s in SHAPES.items():
        assert bool((w[n][~prev[n]] == 0).all()) and bool((w[n][~masks[n]] == 0).all())
        ref = dense_obs(w0[n], dense_inverse(n, math.prod(s), grads, B, damp, m), ~masks[n], B).view(s)
        torch.testing.assert_close(w[n], torch.where(masks[n], ref, torch.zeros_like(ref)), rtol=0, atol=1e-8)
    # ... whereas S = newly pruned only moves previously pruned weights (then re-zeroed): differs
    w2 = {n: t.clone() for n, t in w0.items()}
    obs_update(w2, finv, masks, previous=prev, constrain_previous=False)
    assert any(not torch.allclose(w2[n], w[n]) for n in SHAPES)


# ------------------------------------------------------------------ (d) global allocation
LAYERS = {"q": (6, 8), "ffn": (10, 7), "small": (3, 5), "one": (1, 1)}  # 48 + 70 + 15 + 1 = 134


@pytest.mark.parametrize("with_prev", [False, True])
def test_global_exact_count(with_prev):
    N = sum(math.prod(s) for s in LAYERS.values())
    grads = make_grads(LAYERS, 12, seed=41)
    finv = build(LAYERS, grads, 8, 1e-2)
    prev = _random_mask(LAYERS, 0.2, seed=42) if with_prev else None
    n_prev = sum(int((~p).sum()) for p in prev.values()) if prev else 0
    for sp in (0.0, 0.05, 0.3, 1 / 3, 0.5, 0.77, 0.9, 0.999, 1.0):
        k = round(sp * N)
        w = {n: t * (prev[n] if prev else 1) for n, t in make_weights(LAYERS, seed=43).items()}
        masks, _ = obert_prune(w, finv, sp, previous=prev, scope="global")
        pruned = sum(int((~mk).sum()) for mk in masks.values())
        zeros = sum(int((t == 0).sum()) for t in w.values())
        assert pruned == max(k, n_prev) and zeros == pruned, sp
        if prev:
            assert all(bool((~masks[n])[~prev[n]].all()) for n in LAYERS)
        if prev is None or k >= n_prev:
            assert pruned == k


def test_global_is_one_threshold():
    grads = make_grads(LAYERS, 12, seed=51)
    w = make_weights(LAYERS, seed=52)
    for g in grads:  # make layers' curvature scales differ so a per-layer split would differ
        g["ffn"] = g["ffn"] * 30
    finv = build(LAYERS, grads, 8, 1e-2)
    sc = obs_saliency(w, finv)
    masks = select_masks(sc, 0.5, scope="global")
    pr = torch.cat([sc[n][~masks[n]] for n in LAYERS])
    kept = torch.cat([sc[n][masks[n]] for n in LAYERS])
    assert float(pr.max()) <= float(kept.min())
    per_layer_sp = {n: float((~masks[n]).float().mean()) for n in LAYERS}
    assert max(per_layer_sp.values()) - min(per_layer_sp.values()) > 0.2  # genuinely non-uniform


def test_global_exact_with_ties():
    scores = {n: torch.zeros(s) for n, s in LAYERS.items()}
    prev = _random_mask(LAYERS, 0.1, seed=61)
    for sp in (0.25, 0.5, 0.61):
        m = select_masks(scores, sp, previous=prev, scope="global")
        assert sum(int((~x).sum()) for x in m.values()) == round(sp * 134)
        again = select_masks(scores, sp, previous=prev, scope="global")
        assert all(torch.equal(m[n], again[n]) for n in LAYERS)
        # ties: after the previously pruned, the lowest global positions go first
        flat = torch.cat([~m[n].flatten() for n in LAYERS])
        prev_flat = torch.cat([~prev[n].flatten() for n in LAYERS])
        new = torch.nonzero(flat & ~prev_flat).flatten()
        cand = torch.nonzero(~prev_flat).flatten()
        assert torch.equal(new, cand[: new.numel()])


# ------------------------------------------------------------------ (e) per-layer allocation
@pytest.mark.parametrize("with_prev", [False, True])
def test_per_layer_targets(with_prev):
    grads = make_grads(LAYERS, 12, seed=71)
    finv = build(LAYERS, grads, 4, 1e-2)
    prev = _random_mask(LAYERS, 0.15, seed=72) if with_prev else None
    targets = {"q": 0.25, "ffn": 0.5, "small": 0.8, "one": 1.0}
    w = {n: t * (prev[n] if prev else 1) for n, t in make_weights(LAYERS, seed=73).items()}
    masks, _ = obert_prune(w, finv, targets, previous=prev, scope="layer")
    for n, s in LAYERS.items():
        k = round(targets[n] * math.prod(s))
        n_prev = int((~prev[n]).sum()) if prev else 0
        assert int((~masks[n]).sum()) == max(k, n_prev) == int((w[n] == 0).sum())
        if prev:
            assert bool((~masks[n])[~prev[n]].all())
    for sp in (0.1, 0.5, 0.9):  # a single float for every layer
        m = select_masks(obs_saliency(w, finv), sp)
        for n, s in LAYERS.items():
            assert int((~m[n]).sum()) == round(sp * math.prod(s))


def test_bad_arguments():
    sc = {"a": torch.rand(3, 3)}
    with pytest.raises(ValueError):
        select_masks(sc, {"a": 0.5}, scope="global")
    with pytest.raises(ValueError):
        select_masks(sc, 1.5)
    with pytest.raises(ValueError):
        select_masks(sc, 0.5, scope="block")
    with pytest.raises(FloatingPointError):
        select_masks({"a": torch.tensor([float("nan"), 1.0])}, 0.5)


# ------------------------------------------------------------------ float32 behaviour
@pytest.mark.parametrize("ratio,tol", [(1e-1, 1e-4), (1e-3, 1e-3)])
def test_float32_inverse_accuracy(ratio, tol):
    """float32 Woodbury vs float64 dense, damp = ratio * mean g^2 at a BERT-like gradient scale."""
    shapes = {"w": (16, 64)}
    B, m = 32, 64
    grads = make_grads(shapes, m, seed=81, scale=1e-3)
    damp = suggest_damp(grads[0], ratio)
    f32 = build(shapes, [{k: v.float() for k, v in g.items()} for g in grads], B, damp, dtype=torch.float32)
    assert 0.5 * ratio < f32.damping_ratio() < 2 * ratio
    ref = dense_inverse("w", 1024, grads, B, damp, m)
    d32 = f32.diag()["w"].double().flatten()
    rel = float(((d32 - torch.diagonal(ref)).abs() / torch.diagonal(ref)).max())
    assert rel < tol, rel
    # the full pipeline agrees on the masks with the float64 one (no near-ties at this size)
    w = make_weights(shapes, seed=82)
    f64 = build(shapes, grads, B, damp)
    m32 = select_masks(obs_saliency({"w": w["w"].float()}, f32), 0.5)
    m64 = select_masks(obs_saliency(w, f64), 0.5)
    assert float((m32["w"] != m64["w"]).float().mean()) < 0.01


def test_float32_update_end_to_end():
    shapes = {"w": (16, 64)}
    grads = [{k: v.float() for k, v in g.items()} for g in make_grads(shapes, 64, seed=91, scale=1e-3)]
    f32 = build(shapes, grads, 32, suggest_damp(grads[0], 1e-2), dtype=torch.float32)
    w = {"w": make_weights(shapes, seed=92)["w"].float()}
    w0 = w["w"].clone()
    masks, losses = obert_prune(w, f32, 0.7)
    assert w["w"].dtype == torch.float32 and int((w["w"] == 0).sum()) == round(0.7 * 1024)
    assert torch.isfinite(w["w"]).all() and losses["w"] > 0
    assert float((w["w"] - w0)[masks["w"]].abs().max()) > 0


def test_per_layer_damp_and_ratio():
    grads = make_grads(SHAPES, 20, seed=101)
    for g in grads:
        g["b"] = g["b"] * 1e-3  # very different gradient scale
    damp = suggest_damp(grads[0], 1e-2, per_layer=True)
    assert damp["b"] < 1e-5 * damp["a"]
    finv = build(SHAPES, grads, 8, damp)
    for n, s in SHAPES.items():
        ref = dense_inverse(n, math.prod(s), grads, 8, damp[n], 20)
        ours = torch.block_diag(*finv.finv[n])[: ref.shape[0], : ref.shape[0]]
        assert float((ours - ref).abs().max()) <= 1e-9 * float(ref.abs().max())
        assert 0.3e-2 < finv.damping_ratio(n) < 3e-2
    glob = build(SHAPES, grads, 8, suggest_damp(grads[0], 1e-2))
    assert glob.damping_ratio("b") > 1e3  # one damp for all: the small-gradient layer is all damping


def test_compute_loss_false_same_weights():
    grads = make_grads(SHAPES, 20, seed=111)
    w0 = make_weights(SHAPES, seed=112)
    finv = build(SHAPES, grads, 8, 1e-2)
    masks = select_masks(obs_saliency(w0, finv), 0.5)
    for method in ("none", "independent", "obs"):
        a = {n: t.clone() for n, t in w0.items()}
        b = {n: t.clone() for n, t in w0.items()}
        obs_update(a, finv, masks, method=method)
        la = obs_update(b, finv, masks, method=method, compute_loss=False)
        assert all(torch.equal(a[n], b[n]) for n in SHAPES)
        assert all(math.isnan(v) for v in la.values()) == (method != "obs")


# ---- the obs criterion inside a gradual prune stage ------------------------------------------------


def test_the_obs_criterion_prunes_by_saliency_and_compensates_in_a_real_fit(tmp_path):
    """A SparsityRamp with criterion=obs on an MLP: the target is reached exactly, pruned weights are
    exactly 0, and at the update the kept weights moved (the OBS compensation), unlike magnitude."""
    import lightning as L

    from dpq.prune.callbacks import SparsityRamp
    from dpq.prune.obs import ObsOptions

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: only pruning changes weights

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 12, generator=g), torch.randint(0, 3, (96,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)

    def fit(criterion):
        net = Net()
        before = {n: p.detach().clone() for n, p in net.model.named_parameters()}
        ramp = SparsityRamp(
            "p",
            ["0", "2"],
            0.0,
            0.5,
            update_every=4,
            ramp_end=1.0,
            criterion=criterion,
            obs=ObsOptions(block_size=8, num_grads=4, damp_ratio=1e-2),
        )
        trainer = L.Trainer(
            max_epochs=1,
            callbacks=[ramp],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(net, loader)
        return net, before, ramp

    net, before, ramp = fit("obs")
    for n in ("0", "2"):
        w, keep = net.model.get_submodule(n).weight, ramp.masks[n]
        assert int((~keep).sum()) == round(0.5 * keep.numel())
        assert torch.equal(w[~keep], torch.zeros(int((~keep).sum())))
        assert not torch.equal(w[keep], before[f"{n}.weight"][keep])  # compensated
    mag, before_m, ramp_m = fit("magnitude")
    w = mag.model.get_submodule("0").weight
    assert torch.equal(w[ramp_m.masks["0"]], before_m["0.weight"][ramp_m.masks["0"]])  # magnitude: untouched
    assert not torch.equal(ramp.masks["0"], ramp_m.masks["0"])  # second order chooses other weights


def test_obs_with_structured_groups_is_a_config_error():
    from dpq.core.errors import ConfigError
    from dpq.stages.prune import PruneStage

    with pytest.raises(ConfigError, match="prunes single weights") as e:
        PruneStage.from_config("prune", {"kind": "prune", "criterion": "obs", "granularity": "heads"})
    assert e.value.key == "pipeline.stages.prune.criterion"
    with pytest.raises(ConfigError) as e:
        PruneStage.from_config("prune", {"kind": "prune", "criterion": "obs", "obs": {"blocks": 4}})
    assert e.value.key == "pipeline.stages.prune.obs.blocks"


@pytest.mark.parametrize(
    "obs, key, said",
    [
        ({"block_size": "abc"}, "block_size", "must be an integer >= 1"),
        ({"num_grads": 2.7}, "num_grads", "must be an integer >= 1"),  # was taken as 2
        ({"num_grads": True}, "num_grads", "must be an integer >= 1"),  # was taken as 1
        ({"damp_ratio": "small"}, "damp_ratio", "must be a finite number > 0"),
        ({"damp_ratio": math.inf}, "damp_ratio", "must be a finite number > 0"),  # failed at the first update
        ({"update": "full"}, "update", "must be one of obs, none, independent"),
    ],
)
def test_each_obs_setting_is_checked_as_typed_and_named(obs, key, said):
    from dpq.core.errors import ConfigError
    from dpq.stages.prune import PruneStage

    with pytest.raises(ConfigError, match=said) as e:
        PruneStage.from_config("prune", {"kind": "prune", "criterion": "obs", "obs": obs})
    assert e.value.key == f"pipeline.stages.prune.obs.{key}"
    stage = PruneStage.from_config("prune", {"kind": "prune", "criterion": "obs", "obs": {"damp_ratio": 1}})
    assert stage.cfg.obs == {"damp_ratio": 1.0}


def test_a_layer_with_an_all_zero_gradient_gets_the_overall_damp():
    """Global allocation at a high target can mask a whole layer; its gradient is then all zero, and its
    per-layer damp falls back to the overall one instead of failing the run."""
    g = {"a": torch.full((4, 4), 2.0), "b": torch.ones(4, 4)}
    masks = {"a": torch.ones(4, 4, dtype=torch.bool), "b": torch.zeros(4, 4, dtype=torch.bool)}
    damp = suggest_damp(g, 1e-2, masks=masks, per_layer=True)
    assert damp["a"] == pytest.approx(1e-2 * 4.0)
    assert damp["b"] == pytest.approx(1e-2 * (16 * 4.0) / 32)  # the overall mean g^2 over both layers
    with pytest.raises(ValueError, match="all gradients are zero"):
        suggest_damp({"a": torch.zeros(2)}, 1e-2, per_layer=True)


def test_a_layer_with_a_negligible_gradient_gets_the_overall_damp_not_an_overflowing_one():
    """A damp of 1e-49 (seen in a spiral round) makes the float32 inverse I/damp infinite."""
    g = {"a": torch.ones(4, 4), "b": torch.full((4, 4), 1e-25)}
    damp = suggest_damp(g, 1e-2, per_layer=True)
    overall = 1e-2 * (16 * 1.0 + 16 * 1e-50) / 32
    assert damp["a"] == pytest.approx(1e-2) and damp["b"] == pytest.approx(overall)
    finv = BlockFisherInverse({"b": (4, 4)}, 1, 4, {"b": damp["b"]})
    finv.add_gradient({"b": g["b"]})
    assert torch.isfinite(finv.finv["b"]).all()


def test_damp_ratio_is_relative_to_the_mean_g2_over_all_weights_pruned_zeros_included():
    """The documented meaning (ObsOptions, suggest_damp): masked weights' gradients count as zeros in the mean,
    so damping_ratio() stays the ratio asked, and against the kept weights alone it is ratio * kept/numel."""
    g = {"a": torch.arange(1.0, 17.0, dtype=D64).view(4, 4)}
    mask = {"a": torch.arange(16).view(4, 4) % 4 != 0}  # 12 of 16 kept
    damp = suggest_damp(g, 1e-2, masks=mask, per_layer=True)["a"]
    kept_sq = float((g["a"][mask["a"]] ** 2).sum())
    assert damp == pytest.approx(1e-2 * kept_sq / 16)  # over all 16 weights, not the 12 kept
    assert damp == pytest.approx(1e-2 * (12 / 16) * kept_sq / 12)
    finv = BlockFisherInverse({"a": (4, 4)}, 1, 4, damp, dtype=D64)
    finv.add_gradient(g, masks=mask)
    assert finv.damping_ratio("a") == pytest.approx(1e-2)
