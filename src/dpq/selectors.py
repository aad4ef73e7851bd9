"""Module selectors: which modules a stage touches, chosen by name.

A selector is an exact qualified module name, or ``re:<regex>`` matched against the whole
name (``re.fullmatch``), or a list of those (their union). This is the convention of
llm-compressor/SparseML recipes, so users can copy their target lists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

Selector = str | Iterable[str]


def _patterns(selector: Selector) -> list[str]:
    if isinstance(selector, str):
        return [selector]
    return [str(s) for s in selector]


def matches(name: str, selector: Selector) -> bool:
    for pat in _patterns(selector):
        if pat.startswith("re:"):
            if re.fullmatch(pat[3:], name):
                return True
        elif pat == name:
            return True
    return False


def select_linears(model: nn.Module, selector: Selector) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules of ``model`` that ``selector`` picks."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches(n, selector)]


PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def select_prunable(model: nn.Module, selector: Selector) -> list[str]:
    """Linear and convolution modules that ``selector`` picks (pruning targets).

    Quantization targets are chosen by ``dpq.quant.select_modules``: ``nn.Linear`` and ``nn.Conv2d``.
    """
    return [n for n, m in model.named_modules() if isinstance(m, PRUNABLE) and matches(n, selector)]
