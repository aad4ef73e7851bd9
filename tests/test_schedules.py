import pytest

from dpq.prune.schedules import polynomial_sparsity, ramp_progress


@pytest.mark.parametrize("exponent", [1, 3])
def test_ramp_hits_initial_at_start_and_final_at_end(exponent):
    assert polynomial_sparsity(0.0, 0.1, 0.8, exponent) == pytest.approx(0.1)
    assert polynomial_sparsity(1.0, 0.1, 0.8, exponent) == pytest.approx(0.8)
    assert polynomial_sparsity(2.0, 0.1, 0.8, exponent) == pytest.approx(0.8)  # clipped, held after the ramp


def test_cubic_ramp_is_monotone_and_front_loaded():
    values = [polynomial_sparsity(p / 100, 0.0, 0.5, 3) for p in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    # Zhu & Gupta: half-way through, the cubic ramp is 7/8 of the way to the target.
    assert polynomial_sparsity(0.5, 0.0, 0.5, 3) == pytest.approx(0.5 * 7 / 8)


def test_ramp_progress_is_a_pure_function_of_the_step():
    assert ramp_progress(0, 100, 0.75) == 0.0
    assert ramp_progress(75, 100, 0.75) == 1.0
    assert ramp_progress(100, 100, 0.75) == 1.0
    assert ramp_progress(30, 100, 0.75) == ramp_progress(30, 100, 0.75) == pytest.approx(0.4)
