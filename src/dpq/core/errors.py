"""User-facing errors.

A :class:`ConfigError` is a user mistake (bad override, unknown stage, missing data
offline). The Hydra entry point prints its message alone, without a traceback, and exits
with status 2 -- always before any training starts. :class:`TrainingDiverged` (NaN/Inf loss or
weights) exits with status 3 and :class:`IntegrityError` (a check between stages) with 4; both
keep the results measured so far and the last good checkpoint.
"""


class ConfigError(ValueError):
    """A configuration the user wrote cannot run; the message names key, value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str, hint: str | None = None):
        self.key, self.value, self.allowed = key, value, allowed
        msg = f"{key}={'null' if value is None else repr(value)}: {allowed}"  # null: what the user wrote
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stops instead of training on garbage."""


class IntegrityError(RuntimeError):
    """A check between stages failed (pruned weights came back, the saved model does not reproduce the run)."""
