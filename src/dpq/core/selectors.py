"""Module selectors: which modules a stage touches, chosen by name.

A selector is an exact qualified module name, or ``re:<regex>`` matched against the whole
name (``re.fullmatch``), or a list of those (their union). This is the convention of
llm-compressor/SparseML recipes, so users can copy their target lists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from dpq.core.errors import ConfigError

Selector = str | Iterable[str]

PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


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


def select_prunable(model: nn.Module, selector: Selector) -> list[str]:
    """Linear and convolution modules that ``selector`` picks (pruning targets).

    Quantization targets are chosen by ``dpq.quant.select_modules``: ``nn.Linear`` and ``nn.Conv2d``.
    """
    return [n for n, m in model.named_modules() if isinstance(m, PRUNABLE) and matches(n, selector)]


def check_selector(key: str, selector: Any) -> None:
    """A selector is a name, ``re:<regex>`` or a list of those; a bad regex is a :class:`ConfigError`."""
    if selector is None:
        raise ConfigError(key, None, "no target modules: set it (a name, 're:<regex>' or a list of those)")
    if not isinstance(selector, (str, list, tuple)):
        raise ConfigError(key, selector, "must be a module name, 're:<regex>' or a list of those")
    if not selector:
        raise ConfigError(
            key, selector, "must name at least one module: a module name, 're:<regex>' or a list of those"
        )
    for pat in [selector] if isinstance(selector, str) else list(selector):
        if not isinstance(pat, str):
            raise ConfigError(key, selector, "must be a module name, 're:<regex>' or a list of those")
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as e:
                raise ConfigError(key, selector, f"'{pat}' is not a valid regular expression ({e})") from None


def resolve_targets(own: Any, own_key: str, model_spec: dict, spec_field: str) -> tuple[Any, str]:
    """``(selector, key)``: a stage's own ``targets`` if set, else ``model.<spec_field>``."""
    if own is not None:
        return own, own_key
    return model_spec.get(spec_field), f"model.{spec_field}"


def select_checked(
    model: nn.Module, selector: Any, key: str, kinds: tuple[type[nn.Module], ...], what: str
) -> list[str]:
    """Names of ``kinds`` modules that ``selector`` picks; a bad selector or an empty match is a
    :class:`ConfigError` naming ``key`` and a few modules the model does have."""
    check_selector(key, selector)
    names = [n for n, m in model.named_modules() if isinstance(m, kinds) and matches(n, selector)]
    if not names:
        have = [n for n, m in model.named_modules() if isinstance(m, kinds)]
        other = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and matches(n, selector)]
        if other:  # it names modules, of a kind this stage does not touch (LayerNorm, say): not "no module"
            raise ConfigError(
                key,
                selector,
                f"matches {len(other)} module(s) of the {model.__class__.__name__}, none an {what}: "
                f"{', '.join(other[:4])}{', ...' if len(other) > 4 else ''}; it has e.g. {', '.join(have[:4])}",
            )
        raise ConfigError(
            key,
            selector,
            f"matches no module of the {model.__class__.__name__}; it has e.g. "
            f"{', '.join(have[:6]) or 'no ' + what}",
        )
    return names
