import pytest
import torch
import torch.nn.functional as F

from dpq.distill import KDConfig, TeacherLogits, kd_loss


def test_teacher_soft_labels_change_the_student_loss_and_gradient():
    torch.manual_seed(0)
    s = torch.randn(8, 3, requires_grad=True)
    y = torch.randint(0, 3, (8,))
    t1, t2 = torch.randn(8, 3), torch.randn(8, 3)
    cfg = KDConfig(alpha=0.5, temperature=2.0)
    l1, _ = kd_loss(s, t1, y, cfg)
    (g1,) = torch.autograd.grad(l1, s)
    l2, _ = kd_loss(s, t2, y, cfg)
    (g2,) = torch.autograd.grad(l2, s)
    assert not torch.isclose(l1, l2)
    assert not torch.allclose(g1, g2)


def test_loss_formula():
    torch.manual_seed(1)
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    T, a = 3.0, 0.7
    loss, parts = kd_loss(s, t, y, KDConfig(alpha=a, temperature=T))
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    assert loss.item() == pytest.approx((a * T * T * kl + (1 - a) * F.cross_entropy(s, y)).item(), rel=1e-5)
    # alpha = 0 is plain cross-entropy; a teacher that agrees with the student adds no KL.
    assert kd_loss(s, t, y, KDConfig(alpha=0.0))[0].item() == pytest.approx(F.cross_entropy(s, y).item())
    assert kd_loss(s, s.clone(), y, KDConfig(alpha=0.5))[1]["kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_logits_are_computed_once_per_example():
    teacher = torch.nn.Linear(4, 2)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = teacher

        def forward(self, features):
            return self.lin(features)

    cache = TeacherLogits(Wrap(), num_examples=10, num_labels=2)
    x = torch.randn(10, 4)
    idx = torch.tensor([0, 3, 5])
    out = cache({"features": x[idx]}, idx)
    assert torch.allclose(out, teacher(x[idx]))
    again = cache({"features": x[torch.tensor([3, 5, 7])]}, torch.tensor([3, 5, 7]))
    assert cache.forward_examples == 4  # 0, 3, 5 then only 7
    assert torch.allclose(again, teacher(x[torch.tensor([3, 5, 7])]))


def test_ensemble_teacher_averages_soft_labels():
    from dpq.distill import EnsembleTeacher

    lin_a, lin_b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

    class Wrap(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, features):
            return self.lin(features)

    a, b = TeacherLogits(Wrap(lin_a), 6, 3), TeacherLogits(Wrap(lin_b), 6, 3)
    x, idx = torch.randn(6, 4), torch.arange(6)
    T = 2.0
    expected = (0.25 * F.softmax(lin_a(x) / T, -1) + 0.75 * F.softmax(lin_b(x) / T, -1)).log()
    got = EnsembleTeacher([a, b], [1.0, 3.0]).log_probs({"features": x}, idx, T)
    assert torch.allclose(got, expected, atol=1e-5)
    # The KD loss against an ensemble equals KL to the averaged distribution.
    s, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    loss, parts = kd_loss(s, None, y, KDConfig(alpha=1.0, temperature=T), teacher_log_probs=got)
    kl = (expected.exp() * (expected - F.log_softmax(s / T, -1))).sum(-1).mean()
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-4)
    with pytest.raises(ValueError):
        EnsembleTeacher([a, b], [0.0, 0.0])
