"""One compression run: the passive :class:`State`, the services stages use (:class:`RunContext`),
the stage loop (:class:`Runner`), run-level validation, records and results.json, snapshots,
resume, the stage cache and the integrity checks between stages."""

from dpq.run.context import RunContext
from dpq.run.runner import Runner
from dpq.run.state import State
from dpq.run.validate import validate, validate_data

__all__ = ["RunContext", "Runner", "State", "validate", "validate_data"]
