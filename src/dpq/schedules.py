"""Sparsity schedules: pure functions of stage progress, so a resumed run needs only the step."""

from __future__ import annotations


def polynomial_sparsity(progress: float, initial: float, final: float, exponent: float = 3.0) -> float:
    """Zhu & Gupta (2017) gradual pruning ramp: ``s = s_f + (s_i - s_f) * (1 - progress)^exponent``.

    ``progress`` is clipped to [0, 1]; exponent 3 is the paper's cubic ramp (prune fast while
    redundancy is high, slowly near the target), 1 is linear.
    """
    p = min(max(float(progress), 0.0), 1.0)
    return final + (initial - final) * (1.0 - p) ** exponent


def ramp_progress(step: int, total_steps: int, ramp_end: float = 1.0) -> float:
    """Progress of the ramp at optimizer step ``step`` of a stage of ``total_steps`` steps.

    The ramp reaches its target at ``ramp_end`` (a fraction of the stage) and holds after.
    """
    end = max(1.0, ramp_end * total_steps)
    return min(1.0, step / end)
