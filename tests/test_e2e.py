"""End-to-end runs on real (bundled) data with every stage at full length. Marked slow."""

import pytest

from dpq.train import train

pytestmark = pytest.mark.slow


def test_dpq_on_digits_keeps_accuracy_at_half_sparsity_and_4_bits(make_cfg):
    results = train(make_cfg("experiment=digits"))
    stages = {s["stage"]: s["metrics"] for s in results["stages"]}
    final = results["final"]
    assert final["quantized"] and final["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert stages["teacher"]["accuracy"] > 0.95  # the teacher really learned the task
    assert final["accuracy"] >= stages["distill"]["accuracy"] - 0.02
    assert final["effective_gflops"] < 0.6 * stages["distill"]["effective_gflops"]
    assert final["size_bytes"] < stages["recover"]["size_bytes"]
