"""Sparsity schedules: pure functions of stage progress, so a resumed run needs only the step.

Every schedule has the signature ``(progress, initial, final) -> sparsity`` once its own
parameters are bound (:func:`make_schedule`); ``progress`` is clipped to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

Schedule = Callable[[float, float, float], float]


def _clip(progress: float) -> float:
    return min(max(float(progress), 0.0), 1.0)


def polynomial_sparsity(progress: float, initial: float, final: float, exponent: float = 3.0) -> float:
    """Zhu & Gupta (2017) gradual pruning ramp: ``s = s_f + (s_i - s_f) * (1 - progress)^exponent``.

    ``progress`` is clipped to [0, 1]; exponent 3 is the paper's cubic ramp (prune fast while
    redundancy is high, slowly near the target), 1 is linear.
    """
    p = _clip(progress)
    return final + (initial - final) * (1.0 - p) ** exponent


def linear_sparsity(progress: float, initial: float, final: float) -> float:
    """Straight line from ``initial`` to ``final``: the polynomial ramp with exponent 1."""
    return polynomial_sparsity(progress, initial, final, 1.0)


def one_shot_sparsity(progress: float, initial: float, final: float) -> float:
    """``final`` from the very first step (``initial`` is unused), then held: prune once, fine-tune after."""
    return float(final)


def iterative_sparsity(progress: float, initial: float, final: float, iterations: int = 3) -> float:
    """Iterative pruning (Han et al. 2015): ``iterations`` equal jumps at progress 1/k, 2/k, ..., 1.

    A step function: ``initial`` until the first jump, fine-tuning at constant sparsity between
    jumps, ``final`` from progress 1 (the ramp's end) on.
    """
    k = max(1, int(iterations))
    jumps = min(k, math.floor(_clip(progress) * k + 1e-9))  # tolerance: step/end may land a hair below j/k
    if jumps == k:  # exactly final: (final - initial) * k / k can round a hair above it (0.8 * 3 / 3)
        return float(final)
    return initial + (final - initial) * jumps / k


SCHEDULES: dict[str, Callable[..., float]] = {
    "polynomial": polynomial_sparsity,
    "linear": linear_sparsity,
    "one_shot": one_shot_sparsity,
    "iterative": iterative_sparsity,
}


def make_schedule(name: str, exponent: float = 3.0, iterations: int = 3) -> Schedule:
    """The schedule ``name`` with its parameter bound (``exponent`` for polynomial, ``iterations`` for iterative)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r}: must be one of {', '.join(SCHEDULES)}")
    if name == "polynomial":
        return partial(polynomial_sparsity, exponent=float(exponent))
    if name == "iterative":
        return partial(iterative_sparsity, iterations=int(iterations))
    return SCHEDULES[name]


def ramp_progress(step: int, total_steps: int, ramp_end: float = 1.0) -> float:
    """Progress of the ramp at optimizer step ``step`` of a stage of ``total_steps`` steps.

    The ramp reaches its target at ``ramp_end`` (a fraction of the stage) and holds after.
    """
    return min(1.0, step / ramp_end_steps(total_steps, ramp_end))


def ramp_end_steps(total_steps: int, ramp_end: float = 1.0) -> float:
    """The (possibly fractional) step at which the ramp reaches its target; at least 1.

    Rounded to 9 decimals: 0.55 * 100 is 55.00000000000001 in floats, whose ceiling would move the
    update that reaches the target from step 55 to 56."""
    return max(1.0, round(ramp_end * total_steps, 9))
