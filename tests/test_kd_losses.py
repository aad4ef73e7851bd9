import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from dpq.distill import features
from dpq.distill.features import (
    FeatureKDConfig,
    HiddenProjection,
    attention_loss,
    combine_teachers,
    feature_kd_loss,
    hidden_state_loss,
    relation_loss,
    resolve_layer_map,
    uniform_layer_map,
)

ATOL = 1e-6


def tiny_bert(seed: int, hidden: int = 32, layers: int = 2, heads: int = 2, attn: str = "eager"):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        num_labels=3,
        attn_implementation=attn,
        initializer_range=0.3,
    )  # larger than BERT's 0.02, so attention is far from uniform
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(model, batch):
    return model(**batch, output_hidden_states=True, output_attentions=True)


@pytest.fixture(scope="module")
def teacher_out(batch):
    with torch.no_grad():
        return run(tiny_bert(0), batch)


@pytest.fixture(scope="module")
def student_out(batch):
    with torch.no_grad():
        return run(tiny_bert(1, hidden=16, layers=1), batch)


def test_eager_attention_returns_weights_sdpa_does_not(batch, teacher_out):
    assert len(teacher_out.attentions) == 2
    assert teacher_out.attentions[0].shape == (4, 2, 7, 7)
    torch.testing.assert_close(teacher_out.attentions[0].sum(-1), torch.ones(4, 2, 7))
    with torch.no_grad():
        out = run(tiny_bert(0, attn="sdpa"), batch)
    assert not out.attentions  # sdpa: empty, no weights
    cfg = FeatureKDConfig(attention=1.0)
    with pytest.raises(ValueError, match="eager"):
        feature_kd_loss(cfg, out, out, batch["attention_mask"], None)


# --- layer maps ------------------------------------------------------------------------------


def test_uniform_layer_map():
    assert uniform_layer_map(3, 6) == [2, 4, 6]
    assert uniform_layer_map(2, 12) == [6, 12]
    assert uniform_layer_map(4, 4) == [1, 2, 3, 4]
    for n_s, n_t in [(1, 1), (1, 12), (3, 12), (5, 12), (6, 12), (7, 6)]:
        m = uniform_layer_map(n_s, n_t)
        assert len(m) == n_s
        assert m[-1] == n_t
        assert all(1 <= j <= n_t for j in m)
        assert m == sorted(m)


@pytest.mark.parametrize("n_s,n_t", [(0, 4), (2, 0), (-1, 3), (2.0, 4), (True, 4)])
def test_uniform_layer_map_rejects_bad_counts(n_s, n_t):
    with pytest.raises(ValueError, match="n_student|n_teacher"):
        uniform_layer_map(n_s, n_t)


def test_resolve_layer_map():
    assert resolve_layer_map(None, 3, 6) == [2, 4, 6]
    assert resolve_layer_map([1, 6, 6], 3, 6) == [1, 6, 6]
    with pytest.raises(ValueError, match="one per student layer"):
        resolve_layer_map([1, 2], 3, 6)
    with pytest.raises(ValueError, match=r"7.*1\.\.6"):
        resolve_layer_map([1, 2, 7], 3, 6)
    with pytest.raises(ValueError, match=r"0.*1\.\.6"):
        resolve_layer_map([0, 2, 6], 3, 6)


# --- projection --------------------------------------------------------------------------------


def test_projection_only_when_widths_differ():
    same = HiddenProjection(32, 32, n_layers=2)
    assert not same.needed
    assert list(same.parameters()) == []
    h = torch.randn(2, 3, 32)
    assert same(h, 1) is h
    diff = HiddenProjection(16, 32, n_layers=2)
    assert diff.needed
    assert sum(p.numel() for p in diff.parameters()) == 2 * (16 * 32 + 32)
    assert diff(torch.randn(2, 3, 16), 2).shape == (2, 3, 32)
    with pytest.raises(ValueError):
        diff(torch.randn(2, 3, 16), 3)


def test_gradients_flow_into_projection_and_student(batch, teacher_out):
    student = tiny_bert(1, hidden=16, layers=1).train()
    proj = HiddenProjection(16, 32, n_layers=1)
    out = run(student, batch)
    loss, parts = feature_kd_loss(
        FeatureKDConfig(hidden=1.0, attention=1.0, relation=1.0),
        out,
        teacher_out,
        batch["attention_mask"],
        proj,
    )
    assert set(parts) == {"hidden", "attention", "relation"}
    loss.backward()
    for p in proj.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    emb = student.bert.embeddings.word_embeddings.weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_different_widths_without_projection_raise(student_out, teacher_out):
    with pytest.raises(ValueError, match="HiddenProjection"):
        hidden_state_loss(student_out.hidden_states, teacher_out.hidden_states, None)


# --- zero when equal, positive when different -------------------------------------------------


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_zero_when_equal_positive_when_different(kind, batch, teacher_out, student_out):
    mask = batch["attention_mask"]
    hs = teacher_out.hidden_states
    same = hidden_state_loss(
        hs, hs, None, kind=kind, projection=HiddenProjection(32, 32, 2), attention_mask=mask
    )
    assert same.item() == pytest.approx(0.0, abs=ATOL)
    other = run(tiny_bert(5), batch).hidden_states  # same shape, other weights
    assert hidden_state_loss(other, hs, None, kind=kind, attention_mask=mask).item() > 1e-3
    proj = HiddenProjection(16, 32, 1)
    diff = hidden_state_loss(
        student_out.hidden_states, hs, None, kind=kind, projection=proj, attention_mask=mask
    )
    assert diff.item() > 1e-3


def test_hidden_mse_matches_formula_without_mask():
    torch.manual_seed(0)
    s = tuple(torch.randn(2, 5, 8) for _ in range(3))
    t = tuple(torch.randn(2, 5, 8) for _ in range(5))
    loss = hidden_state_loss(s, t, [2, 4], kind="mse")
    expected = (F.mse_loss(s[1], t[2]) + F.mse_loss(s[2], t[4])) / 2
    torch.testing.assert_close(loss, expected)
    cos = hidden_state_loss(s, t, [2, 4], kind="cosine")
    expected = (
        (1 - F.cosine_similarity(s[1], t[2], dim=-1)).mean()
        + (1 - F.cosine_similarity(s[2], t[4], dim=-1)).mean()
    ) / 2
    torch.testing.assert_close(cos, expected)


def test_attention_loss_zero_when_equal_positive_when_different(batch, teacher_out, student_out, caplog):
    mask = batch["attention_mask"]
    a = teacher_out.attentions
    assert attention_loss(a, a, None, attention_mask=mask).item() == pytest.approx(0.0, abs=ATOL)
    assert attention_loss(student_out.attentions, a, None, attention_mask=mask).item() > 1e-4
    # different head counts (a head shrink): compared head-averaged, and said once per layer pair
    with torch.no_grad():
        four_heads = run(tiny_bert(2, hidden=16, layers=1, heads=4), batch).attentions
    assert attention_loss(four_heads, a, [2], attention_mask=mask).item() > 1e-4
    averaged = tuple(x.mean(1, keepdim=True).expand(-1, 4, -1, -1) for x in a)  # 4 heads, same average
    caplog.clear()
    features.say_again()  # (said once per stage: another test may have met these counts)
    for _ in range(3):
        assert attention_loss(averaged, a, None, attention_mask=mask).item() == pytest.approx(0.0, abs=ATOL)
    said = [r.getMessage() for r in caplog.records if "head-averaged" in r.getMessage()]
    assert len(said) == len(a) and "student layer 1 has 4 heads, teacher layer 1 has 2" in said[0]


def test_attention_loss_is_kl_of_rows():
    torch.manual_seed(0)
    s = (torch.softmax(torch.randn(2, 3, 4, 4), -1),)
    t = (torch.softmax(torch.randn(2, 3, 4, 4), -1),)
    expected = (t[0] * (t[0].log() - s[0].log())).sum(-1).mean()
    torch.testing.assert_close(attention_loss(s, t, [1]), expected)


def test_relation_loss_zero_when_equal_positive_when_different(teacher_out, student_out):
    t = teacher_out.hidden_states[-1][:, 0]
    assert relation_loss(t, t).item() == pytest.approx(0.0, abs=ATOL)
    assert relation_loss(t * 3.0, t).item() == pytest.approx(0.0, abs=ATOL)  # scale-invariant
    s = student_out.hidden_states[-1][:, 0]  # [4, 16] vs [4, 32]
    assert relation_loss(s, t).item() > 1e-4
    with pytest.raises(ValueError, match="batch"):
        relation_loss(s[:3], t)


def test_feature_kd_loss_zero_for_self_and_weighted_sum(batch, teacher_out, student_out):
    mask = batch["attention_mask"]
    cfg = FeatureKDConfig(hidden=1.0, hidden_kind="cosine", attention=2.0, relation=3.0)
    loss, parts = feature_kd_loss(cfg, teacher_out, teacher_out, mask, HiddenProjection(32, 32, 2))
    assert loss.item() == pytest.approx(0.0, abs=ATOL)
    loss, parts = feature_kd_loss(cfg, student_out, teacher_out, mask, HiddenProjection(16, 32, 1))
    assert all(v.item() > 0 for v in parts.values())
    expected = parts["hidden"] + 2 * parts["attention"] + 3 * parts["relation"]
    torch.testing.assert_close(loss, expected)
    loss, parts = feature_kd_loss(FeatureKDConfig(), student_out, teacher_out, mask, None)
    assert loss.item() == 0.0 and parts == {}


# --- padding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_padding_positions_are_ignored(kind):
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    s = [torch.randn(2, 5, 8) for _ in range(3)]
    t = tuple(torch.randn(2, 5, 8) for _ in range(3))
    base = hidden_state_loss(tuple(s), t, None, kind=kind, attention_mask=mask)
    changed = [x.clone() for x in s]
    for x in changed:
        x[mask == 0] = 100 * torch.randn_like(x[mask == 0])
    torch.testing.assert_close(
        hidden_state_loss(tuple(changed), t, None, kind=kind, attention_mask=mask), base
    )
    # without the mask the change is visible, so the check above can fail
    assert not torch.isclose(
        hidden_state_loss(tuple(changed), t, None, kind=kind), hidden_state_loss(tuple(s), t, None, kind=kind)
    )


def test_attention_padding_queries_are_ignored(batch, teacher_out, student_out):
    mask = batch["attention_mask"]
    base = attention_loss(student_out.attentions, teacher_out.attentions, None, attention_mask=mask)
    noisy = tuple(x.clone() for x in student_out.attentions)
    for x in noisy:
        pad_q = (mask == 0)[:, None, :, None].expand_as(x)
        x[pad_q] = torch.softmax(torch.randn_like(x), -1)[pad_q]
    torch.testing.assert_close(attention_loss(noisy, teacher_out.attentions, None, attention_mask=mask), base)


# --- multiple teachers -----------------------------------------------------------------------


def test_combine_teachers():
    torch.manual_seed(0)
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    T = 2.0
    one = combine_teachers([a], None, T)
    torch.testing.assert_close(one, F.log_softmax(a / T, -1))
    torch.testing.assert_close(combine_teachers([a, a], None, T), one)
    torch.testing.assert_close(combine_teachers([a, b], [1.0, 0.0], T), one)
    mixed = combine_teachers([a, b], [3.0, 1.0], T)
    torch.testing.assert_close(mixed.exp(), 0.75 * F.softmax(a / T, -1) + 0.25 * F.softmax(b / T, -1))
    torch.testing.assert_close(mixed.logsumexp(-1), torch.zeros(6), atol=1e-6, rtol=0)
    s = torch.randn(6, 4)
    kl = F.kl_div(F.log_softmax(s / T, -1), mixed, log_target=True, reduction="batchmean")
    assert math.isfinite(kl.item()) and kl.item() > 0


@pytest.mark.parametrize("weights", [[1.0], [1.0, -0.5], [0.0, 0.0], [1.0, float("nan")]])
def test_combine_teachers_rejects_bad_weights(weights):
    a = torch.randn(2, 3)
    with pytest.raises(ValueError, match="weights"):
        combine_teachers([a, a], weights, 1.0)


# --- config ----------------------------------------------------------------------------------


def test_feature_kd_config():
    assert not FeatureKDConfig().active
    cfg = FeatureKDConfig(relation=0.5)
    assert cfg.active and cfg.needs_hidden and not cfg.needs_attentions
    cfg = FeatureKDConfig(attention=1.0, layer_map=(2, 4))
    assert cfg.needs_attentions and not cfg.needs_hidden and cfg.layer_map == [2, 4]
    with pytest.raises(ValueError, match="hidden=-1"):
        FeatureKDConfig(hidden=-1.0)
    with pytest.raises(ValueError, match=r"hidden_kind='l1'.*mse.*cosine"):
        FeatureKDConfig(hidden_kind="l1")
    with pytest.raises(ValueError, match="layer_map"):
        FeatureKDConfig(layer_map=[0, 2])


def test_attention_transfer_compares_the_students_maps_before_dropout(batch):
    """Eager attention returns the maps after the attention-probability dropout: a training student equal
    to its teacher had an attention KL far from 0 (rows not summing to 1). The stage switches that dropout
    off while it transfers attention, and gives it back when the fit ends."""
    import copy

    from dpq.distill.features import attention_dropouts
    from dpq.distill.module import ClassifierModule
    from dpq.distill.teachers import TeacherLogits

    teacher = tiny_bert(0)
    for m in teacher.modules():  # no dropout but on the attention probabilities, so the copy equals it
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for d in attention_dropouts(teacher):
        d.p = 0.3
    student = copy.deepcopy(teacher)
    assert len(attention_dropouts(student)) == 2  # one per layer, not the hidden-state dropouts
    module = ClassifierModule(
        student,
        3,
        "distill",
        teacher=TeacherLogits(teacher, 4, 3),
        features=FeatureKDConfig(attention=1.0),
    )
    student.train()
    torch.manual_seed(0)
    dropped = run(student, batch).attentions[0]
    assert not torch.allclose(dropped.sum(-1), torch.ones(()))  # what the loss used to compare
    module.on_fit_start()
    batch_ = {**batch, "labels": torch.zeros(4, dtype=torch.long), "idx": torch.arange(4)}
    _, parts = module._feature_step(batch_)
    assert float(parts["attention"]) == pytest.approx(0.0, abs=1e-6)
    assert all(d.p == 0.0 for d in attention_dropouts(student))
    module.on_fit_end()
    assert all(d.p == 0.3 for d in attention_dropouts(student))
