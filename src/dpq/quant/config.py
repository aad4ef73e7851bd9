"""What to quantize and how: one pure-data config shared by QAT, PTQ and every backend.

Validation raises :class:`~dpq.core.errors.ConfigError` naming the full config key, so the stage
configs (``pipeline.stages.quantize`` / ``pipeline.stages.ptq``) can pass their own prefix
and the user sees e.g. ``pipeline.stages.quantize.granularity='per_row': must be one of ...``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from dpq.core.errors import ConfigError

ALLOWED_BITS: tuple[int, ...] = (2, 3, 4, 8)
ALLOWED_GRANULARITY: tuple[str, ...] = ("per_tensor", "per_channel", "per_group")
ALLOWED_OBSERVERS: tuple[str, ...] = ("minmax", "lsq")
ALLOWED_ACT_BITS: tuple[int | None, ...] = (None, 8)
ALLOWED_CALIBRATION: tuple[str, ...] = ("minmax", "percentile")
ALLOWED_ACT_RANGE: tuple[str, ...] = ("observed", "dynamic")


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer grid ``[-2^(b-1), 2^(b-1) - 1]`` (torchao's convention for intN)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass
class QuantConfig:
    """Weight (and optional activation) quantization of the selected ``nn.Linear`` / ``nn.Conv2d`` modules.

    * ``bits``: weight bits, 2 | 3 | 4 | 8.
    * ``granularity``: one scale per tensor, per output channel, or per ``group_size``
      consecutive input weights of a row (a conv's row: its flattened ``in/groups*kh*kw`` filter).
    * ``symmetric``: zero point 0; otherwise an integer zero point (so 0.0 is always
      exactly representable and pruned weights stay exactly zero).
    * ``observer``: weight range from the current ``minmax`` (recomputed every step), or
      ``lsq`` learned step sizes (Esser et al. 2020, symmetric only).
    * ``act_bits``: ``None`` keeps activations float; 8 fake-quantizes each target's input
      per tensor: with ``act_range="observed"``, symmetric int8 over a running min-max range (a
      static scale, as a static int8 kernel uses); with ``"dynamic"``, asymmetric uint8 over each
      input's own range, as ONNX Runtime's ``DynamicQuantizeLinear`` (the activations of
      ``quantize_dynamic``'s kernels) computes it, so the exported integer model is the trained one.
    * ``targets``: selector(s): an exact module name or ``re:<regex>`` (full match).
    * ``quantize_head``: the classifier head (the model's last Linear) stays float unless true.
    * ``calibration`` / ``percentile``: PTQ only: ranges from min-max or from the given
      percentile of |values| (weights per block, activations averaged over batches).
    """

    bits: int = 4
    granularity: str = "per_channel"
    group_size: int = 128
    symmetric: bool = True
    observer: str = "minmax"
    act_bits: int | None = None
    act_range: str = "observed"
    targets: Any = r"re:.*"
    quantize_head: bool = False
    calibration: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if not isinstance(self.targets, str) and self.targets is not None:
            try:  # any sequence (an OmegaConf ListConfig too) is stored as a plain list
                self.targets = [str(t) for t in self.targets]
            except TypeError:
                pass  # validate() reports it

    @property
    def qmin(self) -> int:
        return qrange(self.bits)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits)[1]

    def validate(self, key: str = "quant") -> QuantConfig:
        """Raise :class:`ConfigError` (``<key>.<field>``) for any unsupported value; return self."""
        if type(self.bits) is not int or self.bits not in ALLOWED_BITS:  # 4.0 == 4, but not as a bit width
            raise ConfigError(f"{key}.bits", self.bits, f"must be one of {', '.join(map(str, ALLOWED_BITS))}")
        if self.granularity not in ALLOWED_GRANULARITY:
            raise ConfigError(
                f"{key}.granularity", self.granularity, f"must be one of {', '.join(ALLOWED_GRANULARITY)}"
            )
        if self.granularity == "per_group" and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2
        ):
            raise ConfigError(
                f"{key}.group_size",
                self.group_size,
                "must be an integer >= 2 (input weights per scale; a power of two >= 16 for the ONNX export)",
            )
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"{key}.symmetric", self.symmetric, "must be true or false")
        if self.observer not in ALLOWED_OBSERVERS:
            raise ConfigError(
                f"{key}.observer", self.observer, f"must be one of {', '.join(ALLOWED_OBSERVERS)}"
            )
        if self.observer == "lsq" and not self.symmetric:
            raise ConfigError(
                f"{key}.observer",
                self.observer,
                "LSQ learns the step of a symmetric grid; set symmetric=true or observer=minmax "
                "(a learned zero point could move 0.0 off the grid and revive pruned weights)",
            )
        if self.act_bits not in ALLOWED_ACT_BITS or (
            self.act_bits is not None and type(self.act_bits) is not int
        ):
            raise ConfigError(f"{key}.act_bits", self.act_bits, "must be null (float activations) or 8")
        if self.act_range not in ALLOWED_ACT_RANGE:
            raise ConfigError(
                f"{key}.act_range", self.act_range, f"must be one of {', '.join(ALLOWED_ACT_RANGE)}"
            )
        if self.act_range == "dynamic" and self.act_bits != 8:
            raise ConfigError(
                f"{key}.act_range",
                self.act_range,
                f"quantizes activations, which needs act_bits=8 (act_bits is {self.act_bits!r})",
            )
        if self.calibration not in ALLOWED_CALIBRATION:
            raise ConfigError(
                f"{key}.calibration", self.calibration, f"must be one of {', '.join(ALLOWED_CALIBRATION)}"
            )
        if not (isinstance(self.percentile, (int, float)) and 50.0 < float(self.percentile) <= 100.0):
            raise ConfigError(f"{key}.percentile", self.percentile, "must be in (50, 100]")
        if not isinstance(self.quantize_head, bool):
            raise ConfigError(f"{key}.quantize_head", self.quantize_head, "must be true or false")
        selectors = [self.targets] if isinstance(self.targets, str) else self.targets
        if not isinstance(selectors, list) or not selectors:
            raise ConfigError(
                f"{key}.targets", self.targets, "must be a selector string or a non-empty list of them"
            )
        for sel in selectors:
            if sel.startswith("re:"):
                try:
                    re.compile(sel[3:])
                except re.error as e:
                    raise ConfigError(
                        f"{key}.targets", sel, f"is not a valid regular expression ({e})"
                    ) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
