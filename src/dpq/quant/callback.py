"""The Lightning callback of quantization-aware training.

:class:`QuantizationAware` swaps the target Linears and Conv2ds for fake-quantized ones at setup
(same Parameter objects, so the optimizer and state-dict keys are unchanged; LSQ steps and
activation ranges travel in its ``state_dict`` under a unique ``state_key``, so a resumed fit
continues with the quantizers it had). With ``embedding``, the word-embedding table is
fake-quantized as well (:mod:`dpq.quant.embedding`). With ``keep=False`` the fit ends with plain
float modules again (QAT during a prune or recover stage, ahead of the quantize stage).
"""

from __future__ import annotations

import lightning as L
import torch

from .config import QuantConfig
from .embedding import prepare_embedding_, unprepare_embedding_
from .fake import load_quantizer_state_, prepare_qat_, quantizer_state, unprepare_qat_


class QuantizationAware(L.Callback):
    """Fake-quantize the target Linears / Conv2ds for the whole fit (straight-through estimator in backward)."""

    def __init__(
        self,
        name: str,
        cfg: QuantConfig,
        names: list[str] | None = None,
        embedding: QuantConfig | None = None,
        keep: bool = True,
    ):
        """``keep=False``: at teardown, swap the fake-quantized modules back for plain ones (same
        Parameters), so the weights leave the fit shaped by the quantizer but stored as float."""
        self.name, self.cfg, self.names, self.embedding = name, cfg, names, embedding
        self.keep = keep
        self.prepared: list[str] = []
        self.model: torch.nn.Module | None = None
        self._pending: dict | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.model = pl_module.model
        if not self.prepared:
            # Lightning casts the model to a "-true" half precision after setup: torchao's quantizer would then
            # compute its scales in that dtype, not in float32 as conversion does
            half = str(getattr(trainer, "precision", "32")) in ("bf16-true", "16-true")
            self.prepared = prepare_qat_(self.model, self.cfg, self.names, float32=not half)
        if self.embedding is not None:
            prepare_embedding_(self.model, self.embedding)  # the word-embedding table, fake-quantized too
        if self._pending:
            load_quantizer_state_(self.model, self._pending)
            self._pending = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if not self.keep and self.model is not None:
            self.restore_float()

    def restore_float(self) -> list[str]:
        """Plain float modules in place of the ones this callback prepared (idempotent)."""
        if self.model is None:
            return []
        done = unprepare_qat_(self.model, self.prepared)
        if self.embedding is not None:
            unprepare_embedding_(self.model)
        return done

    def state_dict(self) -> dict:
        return {
            "prepared": list(self.prepared),
            "config": self.cfg.to_dict(),
            "quantizers": quantizer_state(self.model) if self.model is not None else {},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.prepared = list(state_dict.get("prepared", [])) or self.prepared
        quantizers = state_dict.get("quantizers") or {}
        if self.model is not None:
            load_quantizer_state_(self.model, quantizers)
        else:
            self._pending = quantizers
