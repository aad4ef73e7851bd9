"""The command line's overrides, checked against the composed config before Hydra runs anything.

Hydra refuses ``pipeline.stages.prune.final_sparsty=0.8`` with "Key 'final_sparsty' is not in struct"
and advises ``+pipeline.stages.prune.final_sparsty=0.8`` -- for a typo, the wrong fix -- and a mistyped
option (``pipeline=dqp``) with a list that includes the ``_base`` files. This composes the command
line once (each swept value of a multirun once) with Hydra's own compose API and turns those two
failures into dpq's one-line config error: the key, the value, the nearest existing key or option,
and what is allowed. Anything else, composed or not, is left to Hydra as before, so nothing Hydra
accepts is refused here. ``--help`` lists the same groups' options (``conf/hydra/help/dpq.yaml``).
"""

from __future__ import annotations

import re
from difflib import get_close_matches
from pathlib import Path

from dpq.core.config import CONF_DIR
from dpq.core.errors import ConfigError


def check_command_line(argv: list[str]) -> None:
    """Raise :class:`ConfigError` for an override of a key the config lacks or an option a group lacks."""
    overrides, search = [], []
    it = iter(argv)
    for arg in it:
        if arg in ("--config-dir", "-cd"):
            search.append(next(it, ""))
        elif arg.startswith("--config-dir="):
            search.append(arg.split("=", 1)[1])
        elif arg in ("-m", "--multirun"):
            continue
        elif arg.startswith("-"):  # --help, --cfg, --config-name, ...: Hydra's business alone, as before
            return
        else:
            overrides.append(arg)
    if not overrides or not CONF_DIR.is_dir():
        return
    try:
        lists = variants(overrides)
    except Exception:  # an override Hydra's parser refuses: Hydra says so itself
        return
    extra = [f"hydra.searchpath=[{','.join(_file_url(d) for d in search)}]"] if search else []
    for variant in lists:
        _check(variant + extra, search)


def _value(override: str):
    """The value of ``key=value`` as Hydra types it (0.5, not '0.5'; ``{val_f1:1.0}`` a mapping: YAML would
    read that as one key ``'val_f1:1.0'``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).value()
    except Exception:
        return override.split("=", 1)[1]


# Mappings whose entries are summed: Hydra merges a mapping given on the command line into the one the
# config has, so objective.weights={val_f1:1.0} would keep the default weights of val_accuracy and
# effective_gflops (and Hydra refuses a key the defaults lack as "not in struct"). For a weighted sum
# that merge is silently another objective, so such a value must name every weight, or replace the mapping.
SUMMED_MAPPINGS = ("objective.weights",)


def _check_summed_mappings(overrides: list[str], compose) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from omegaconf import OmegaConf

    parsed = OverridesParser.create().parse_overrides(overrides)
    for text, o in zip(overrides, parsed, strict=True):
        key = o.key_or_group
        if key not in SUMMED_MAPPINGS or o.type == OverrideType.DEL or not isinstance(o.value(), dict):
            continue
        if any(p.key_or_group == key and p.type == OverrideType.DEL for p in parsed):
            continue  # '~objective.weights' '+objective.weights={...}' (Hydra refuses a plain = after ~ itself)
        try:
            node = OmegaConf.select(compose("train", overrides=[t for t in overrides if t != text]), key)
        except Exception:
            return  # the rest does not compose: Hydra says why itself
        given, configured = dict(o.value()), dict(node or {})
        if set(given) == set(configured):
            continue
        spelled = _spelled(given)
        replace = f"replace the mapping: '~{key}' '+{key}={spelled}'"
        if set(given) <= set(configured):  # Hydra would merge: the weights not named would stay
            whole = ",".join(f"{k}:{v}" for k, v in {**{k: 0 for k in configured}, **given}.items())
            replace = f"name every weight ({key}={{{whole}}}) or {replace}"
        raise ConfigError(
            key,
            given,
            f"is merged by Hydra into the configured {key} {configured}, not put in their place; {replace}",
        )


def _file_url(folder: str) -> str:
    return "file://" + str(Path(folder).expanduser().resolve())


def _options(group: str, search: list[str]) -> list[str]:
    """A config group's options: dpq's and those in the user's ``--config-dir`` folders (Hydra's loader here knows
    dpq's conf/ only; the folders join its search path at compose time). ``_base`` files are not options."""
    from hydra.core.global_hydra import GlobalHydra

    found = set(GlobalHydra.instance().config_loader().get_group_options(group))
    found |= {p.stem for d in search for p in (Path(d).expanduser() / group).glob("*.yaml")}
    return sorted(o for o in found if not o.startswith("_"))


def _check_null_groups(overrides: list[str], search: list[str]) -> None:
    """``model=null``: Hydra refuses a config group set to null with a traceback ("Config group override must
    be a string or a list"), even for ``experiment=null``, the default. Said as a config error instead."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from omegaconf import OmegaConf

    loader = GlobalHydra.instance().config_loader()
    groups = set(loader.list_groups(""))
    for o in OverridesParser.create().parse_overrides(overrides):
        group = o.key_or_group
        if (
            group not in groups
            or o.type == OverrideType.DEL
            or o.is_sweep_override()
            or o.value() is not None
        ):
            continue
        options = _options(group, search)
        defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "train.yaml")).get("defaults") or []
        optional = any(isinstance(d, dict) and group in d and d[group] is None for d in defaults)
        raise ConfigError(
            group,
            None,
            (f"is the default (no {group}): leave the override out, or choose" if optional else "choose")
            + f" one of the {group} options: {', '.join(options)}",
        )


def variants(overrides: list[str]) -> list[list[str]]:
    """One override list per swept value (the other sweeps at their first value); Optuna's interval() and
    similar search spaces, which compose cannot take, are left out (they name keys Hydra checks per trial)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for text, o in zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True):
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # interval(...), tag(...): a search space, not a list of values
                continue
            # get_key_element() keeps the + / ++ / ~ the override was written with
            choices.append([f"{o.get_key_element()}={v}" for v in values])
        else:
            choices.append([text])
    lists = [[c[0] for c in choices]]
    for i, c in enumerate(choices):
        lists += [[v if j == i else cs[0] for j, cs in enumerate(choices)] for v in c[1:]]
    return lists


def _check(overrides: list[str], search: list[str] = ()) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            _check_null_groups(overrides, list(search))
            _check_summed_mappings(overrides, compose)
            compose("train", overrides=overrides)
            return
        except MissingConfigException as e:
            if not (m := re.search(r"Could not find '([^']+)/([^'/]+)'", str(e))):
                return
            group, option = m.groups()
            options = _options(group, list(search))
            if not options or option in options:
                return
            near = get_close_matches(option, options, n=1)
            raise ConfigError(
                group,  # as typed (hydra/sweeper=...): the dotted name is a config node, not the group
                option,
                f"is not a {group} option"
                + (f" (did you mean {group}={near[0]}?)" if near else "")
                + f"; allowed: {', '.join(options)}",
            ) from None
        except ConfigCompositionException as e:
            cause = f"{e} {e.__cause__}"
            if not (m := re.search(r"Could not override '([^']+)'", str(e))) or "not in struct" not in cause:
                return
            key = m.group(1)
            value = next((_value(o) for o in overrides if o.split("=", 1)[0] == key), None)
            rest = [o for o in overrides if o.split("=", 1)[0] != key]
            try:
                cfg = compose("train", overrides=rest)
            except Exception:
                return
        finally:
            GlobalHydra.instance().clear()
    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, dict) and isinstance(node := OmegaConf.select(cfg, key), DictConfig):
        _refuse_mapping_key(key, value, [str(k) for k in node.keys()])

    parts = key.split(".")
    node, i = cfg, 0
    while i < len(parts) - 1 and isinstance(node, DictConfig) and parts[i] in node:
        node, i = node[parts[i]], i + 1  # down to the first part the config lacks
    parent, name = ".".join(parts[:i]), parts[i]
    allowed = [str(k) for k in node.keys() if str(k) != "hydra"] if isinstance(node, DictConfig) else []
    near = get_close_matches(name, allowed, n=1)
    meant = ".".join([*parts[:i], near[0], *parts[i + 1 :]]) if near else None
    raise ConfigError(
        key,
        value,
        f"{'is' if i == len(parts) - 1 else f'{name} is'} not a {parent or 'run'} setting"
        + (f" (did you mean {meant}?)" if meant else "")
        + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        + f"; a key the config does not have is added with +{key}=... (dpq then checks that it reads it)",
    )


def _spelled(mapping: dict) -> str:
    """A mapping as a Hydra override writes it (a ':' inside a key escaped: ``{re\\:.*\\.dense:0.7}``)."""
    return "{" + ",".join(f"{str(k).replace(':', chr(92) + ':')}:{v}" for k, v in mapping.items()) + "}"


def _refuse_mapping_key(key: str, value: dict, allowed: list[str]) -> None:
    """``task.split={valdation:0.2}``: Hydra merges a mapping into the configured one and refuses a key
    that one lacks. Named here as the key it is (a selector such as ``re:.*\\.dense`` is one key, dots and
    all), with the two ways Hydra takes a new key."""
    new = [str(k) for k in value if str(k) not in allowed]
    if not new:
        return
    near = get_close_matches(new[0], allowed, n=1)
    spelled = _spelled(value)
    raise ConfigError(
        f"{key}.{new[0]}",
        value[new[0]],
        f"{new[0]!r} is not a key of {key}"
        + (f" (did you mean {near[0]!r}?)" if near else "")
        + f"; it has {', '.join(allowed) or 'none'}. Hydra merges a mapping into the configured one: to add"
        f" keys, +{key}={spelled} (the configured ones stay); to replace it, '~{key}' '+{key}={spelled}'",
    )


def config_groups_help() -> str:
    """``--help``'s list of config groups and their options, as Hydra finds them (a user's ``--config-dir``
    included), without the ``_base`` files other options build on (``task=_base`` is not a task)."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    lines = []
    for group in sorted(g for g in loader.list_groups("") if g != "hydra"):
        options = [o for o in loader.get_group_options(group) if not o.startswith("_")]
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def register_help() -> None:
    """The resolver ``conf/hydra/help/dpq.yaml`` lists the groups with."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("dpq_config_groups", config_groups_help, replace=True)
