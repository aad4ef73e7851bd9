"""dpq: multi-stage model compression (distill -> prune -> recover -> quantize).

Stages are Lightning callbacks driven by stage objects; Hydra composes task, models and
pipeline; every run is one point on an accuracy-vs-cost plane, written to results.json.
"""

__version__ = "0.1.0"
