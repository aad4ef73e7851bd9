"""The one place that turns a configured device name into where a model really runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpq.core.errors import ConfigError

ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
COST_DEVICES = ("cpu", "cuda", "auto")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve(device: str | None) -> str:
    """``cpu`` or ``cuda``: ``gpu``/``cuda`` are CUDA, ``auto`` is CUDA when a GPU is visible."""
    if device in ("gpu", "cuda"):
        return "cuda"
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    return "cpu"


def trainer_device(trainer: Mapping[str, Any] | Any) -> str:
    """Where a stage's Lightning Trainer runs the model (``trainer.accelerator``)."""
    accel = (
        trainer.get("accelerator", "cpu")
        if isinstance(trainer, Mapping)
        else getattr(trainer, "accelerator", "cpu")
    )
    return resolve(str(accel or "cpu"))


def latency_device(cost: Mapping[str, Any]) -> str:
    """Where cost (latency, peak memory) is measured: ``cost.device`` (cpu | cuda | auto)."""
    return resolve(cost.get("device", "cpu"))


def check_devices(cfg: Mapping[str, Any]) -> None:
    """``trainer.accelerator`` and ``cost.device`` name devices this machine has."""
    accel = (cfg.get("trainer") or {}).get("accelerator")
    if accel in ("gpu", "cuda") and not cuda_available():
        raise ConfigError(
            "trainer.accelerator", accel, "no CUDA GPU is visible on this machine; use trainer=cpu"
        )
    device = (cfg.get("cost") or {}).get("device", "cpu")
    if device not in COST_DEVICES:
        raise ConfigError("cost.device", device, f"must be one of {', '.join(COST_DEVICES)}")
    if device == "cuda" and not cuda_available():
        raise ConfigError("cost.device", device, "no CUDA GPU is visible on this machine; use cpu or auto")
