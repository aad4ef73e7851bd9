"""Access to the packaged Hydra config tree (``conf/``), for messages and tests."""

from __future__ import annotations

from pathlib import Path

import yaml

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


def list_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def load_option(group: str, name: str) -> dict:
    return yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text()) or {}
