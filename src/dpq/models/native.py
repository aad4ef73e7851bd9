"""dpq's own models: ``arch: mlp`` and ``arch: cnn``.

``mlp`` is a plain multilayer perceptron for feature tasks (digits) and, on flattened pixels,
image tasks; ``cnn`` a small convolutional net (conv -> batch norm -> ReLU blocks, global
average pooling) for image tasks (Fashion-MNIST). Both describe their prunable
neurons/channels to :mod:`dpq.prune.structured` and update their ``config`` after a physical
shrink, so a shrunk model saves and reloads from its config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from dpq.core.errors import ConfigError
from dpq.prune.structured import GroupSet, Slice


def _linear_neuron_sets(prefix: str, layers: nn.ModuleList, after: str, kind: str) -> list[GroupSet]:
    """Hidden ``nn.Linear`` layers ``{prefix}.i`` as neuron sets: neuron j is row j of layer i (weight
    and bias) and column j of the layer that reads it (``{prefix}.{i+1}``, or ``after`` for the last)."""
    sets = []
    for i, layer in enumerate(layers):
        reader = f"{prefix}.{i + 1}" if i + 1 < len(layers) else after
        sets.append(
            GroupSet(
                f"{prefix}.{i}",
                kind,
                layer.out_features,
                (Slice(f"{prefix}.{i}", 0),),
                (Slice(reader, 1, 1, ("weight",)),),
            )
        )
    return sets


class MLPClassifier(nn.Module):
    """features -> [Linear -> ReLU -> Dropout] * k -> Linear head. Modules: ``hidden.i``, ``head``.

    Image tasks feed ``pixel_values`` [B, C, H, W], flattened in (C, H, W) order.
    """

    arch_name = "mlp"

    def __init__(
        self,
        num_features: int,
        num_labels: int,
        hidden: list[int],
        dropout: float = 0.1,
        label_names: list[str] | None = None,
    ):
        super().__init__()
        dims = [num_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act, self.drop = nn.ReLU(), nn.Dropout(dropout)
        self.head = nn.Linear(dims[-1], num_labels)
        self.config = {
            "num_features": num_features,
            "num_labels": num_labels,
            "hidden": list(hidden),
            "dropout": dropout,
            "label_names": list(label_names) if label_names else None,  # class id i predicts label_names[i]
        }

    def forward(
        self, features: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        if features is None and pixel_values is None:
            raise TypeError("MLPClassifier needs features [B, F] or pixel_values [B, C, H, W]")
        x = features if features is not None else pixel_values.flatten(1)
        for layer in self.hidden:
            x = self.drop(self.act(layer(x)))
        return self.head(x)

    def structured_groups(self, kind: str) -> list[GroupSet]:
        """Each hidden layer's neurons; an MLP's "channels" are its neurons, so both kinds give them."""
        if kind not in ("neurons", "channels"):
            return []
        return _linear_neuron_sets("hidden", self.hidden, "head", kind)

    def after_shrink(self) -> None:
        self.config["hidden"] = [layer.out_features for layer in self.hidden]


class ConvBlock(nn.Module):
    """3x3 conv (no bias: batch norm follows) -> batch norm -> ReLU -> optional 2x2 max pool."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


class CNNClassifier(nn.Module):
    """pixel_values [B, C, H, W] -> conv blocks -> global average pool -> [Linear -> ReLU -> Dropout] * k -> head.

    Modules: ``blocks.i.conv`` / ``blocks.i.bn``, ``fc.i``, ``head``. Global average pooling
    (rather than a flatten) makes every channel of the last block one input of the first FC
    layer, so removing a channel removes exactly one input column there. ``pool[i]``: whether
    block i ends in a 2x2 max pool (default: every block but the last).
    """

    arch_name = "cnn"

    def __init__(
        self,
        in_channels: int,
        num_labels: int,
        channels: list[int],
        hidden: list[int] | None = None,
        pool: list[bool] | None = None,
        dropout: float = 0.0,
        label_names: list[str] | None = None,
    ):
        super().__init__()
        channels, hidden = [int(c) for c in channels], [int(h) for h in (hidden or [])]
        if not channels:
            raise ValueError("a CNN needs at least one conv block (channels)")
        pool = (
            [bool(p) for p in pool]
            if pool is not None
            else [i + 1 < len(channels) for i in range(len(channels))]
        )
        if len(pool) != len(channels):
            raise ValueError(f"pool has {len(pool)} entries for {len(channels)} conv blocks")
        ins = [in_channels, *channels[:-1]]
        self.blocks = nn.ModuleList(ConvBlock(a, b, p) for a, b, p in zip(ins, channels, pool))
        self.gap = nn.AdaptiveAvgPool2d(1)
        dims = [channels[-1], *hidden]
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act, self.drop = nn.ReLU(), nn.Dropout(dropout)
        self.head = nn.Linear(dims[-1], num_labels)
        self.config = {
            "in_channels": in_channels,
            "num_labels": num_labels,
            "channels": channels,
            "hidden": hidden,
            "pool": pool,
            "dropout": dropout,
            "label_names": list(label_names) if label_names else None,  # class id i predicts label_names[i]
        }

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values
        for block in self.blocks:
            x = block(x)
        x = self.gap(x).flatten(1)
        for layer in self.fc:
            x = self.drop(self.act(layer(x)))
        return self.head(x)

    def structured_groups(self, kind: str) -> list[GroupSet]:
        """``channels``: each block's output channels (conv filter; batch-norm entries; the next conv's
        input channel, or the first FC/head column after global pooling). ``neurons``: FC hidden units."""
        if kind == "neurons":
            return _linear_neuron_sets("fc", self.fc, "head", kind)
        if kind != "channels":
            return []
        after_convs = "fc.0" if len(self.fc) else "head"
        bn_params = ("weight", "bias", "running_mean", "running_var")
        sets = []
        for i, block in enumerate(self.blocks):
            reader = f"blocks.{i + 1}.conv" if i + 1 < len(self.blocks) else after_convs
            sets.append(
                GroupSet(
                    f"blocks.{i}.conv",
                    kind,
                    block.conv.out_channels,
                    (Slice(f"blocks.{i}.conv", 0),),
                    (Slice(reader, 1, 1, ("weight",)),),
                    extra=(Slice(f"blocks.{i}.bn", 0, 1, bn_params),),
                )
            )
        return sets

    def after_shrink(self) -> None:
        self.config["channels"] = [b.conv.out_channels for b in self.blocks]
        self.config["hidden"] = [layer.out_features for layer in self.fc]


# dpq's own (non-Hugging Face) models: ``arch_name`` -> class. Each keeps a JSON-able ``config``
# dict whose items are its constructor's keyword arguments, so checkpoints can rebuild it.
NATIVE_ARCHES: dict[str, type[nn.Module]] = {"mlp": MLPClassifier, "cnn": CNNClassifier}


def native_from_config(config: Mapping) -> nn.Module:
    """Rebuild a dpq-native model from its saved ``config`` (the ``dpq_arch`` key picks the class)."""
    cls = NATIVE_ARCHES[config["dpq_arch"]]
    return cls(**{k: v for k, v in config.items() if k != "dpq_arch"})


def image_shape(task: dict, key: str = "model") -> list[int]:
    """``task.image_shape`` as [channels, height, width]."""
    shape = task.get("image_shape")
    if not shape or len(shape) != 3:
        raise ConfigError(
            "task.image_shape", shape, f"{key} needs the image task's [channels, height, width]"
        )
    return [int(d) for d in shape]


def build_native(spec: dict, task: dict, key: str) -> nn.Module:
    """An ``mlp`` or ``cnn`` for ``task`` (features or images), freshly initialised."""
    arch, num_labels = spec.get("arch"), int(task["num_labels"])
    if arch == "mlp":
        if task["kind"] == "features":
            num_features = int(task["num_features"])
        elif task["kind"] == "image":
            num_features = math.prod(int(d) for d in image_shape(task, key))
        else:
            raise ConfigError(
                f"{key}.arch",
                arch,
                f"an mlp needs a feature or image task; task '{task['name']}' is {task['kind']}",
            )
        return MLPClassifier(
            num_features,
            num_labels,
            _sizes(spec.get("hidden"), f"{key}.hidden"),
            _dropout(spec.get("dropout", 0.1), f"{key}.dropout"),
            _names(task),
        )
    if task["kind"] != "image":
        raise ConfigError(
            f"{key}.arch", arch, f"a cnn needs an image task; task '{task['name']}' is {task['kind']}"
        )
    channels = _sizes(spec.get("channels"), f"{key}.channels")
    if not channels:
        raise ConfigError(
            f"{key}.channels", spec.get("channels"), "must be a non-empty list of positive channel counts"
        )
    pool = spec.get("pool")
    if pool is not None and (
        not isinstance(pool, (list, tuple))
        or len(pool) != len(channels)
        or any(not isinstance(p, bool) for p in pool)
    ):
        raise ConfigError(f"{key}.pool", pool, f"needs one true/false per conv block ({len(channels)})")
    pools = list(pool) if pool is not None else [i + 1 < len(channels) for i in range(len(channels))]
    shape = image_shape(task, key)
    height, width = shape[1:]
    for i, p in enumerate(pools):  # each 2x2 max pool halves the image; one of 1 pixel gives an empty map
        if p and min(height, width) < 2:
            raise ConfigError(
                f"{key}.pool",
                pools,
                f"block {i} would pool a {height}x{width} map (the {shape[1]}x{shape[2]} image after "
                f"{sum(pools[:i])} pools): set false for some blocks, or use fewer channels entries",
            )
        if p:
            height, width = height // 2, width // 2
    return CNNClassifier(
        shape[0],
        num_labels,
        channels,
        _sizes(spec.get("hidden"), f"{key}.hidden"),
        pools,
        _dropout(spec.get("dropout", 0.0), f"{key}.dropout"),
        _names(task),
    )


def _sizes(value, key: str) -> list[int]:
    """A list of layer widths: positive integers (with a width 0 the head had only its bias: one logit
    vector for every input)."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value
    ):
        raise ConfigError(key, value, "must be a list of positive integers (layer widths), e.g. [256, 128]")
    return [int(v) for v in value]


def _dropout(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(key, value, "must be a number in [0, 1)")
    return float(value)


def _names(task: dict) -> list[str] | None:
    return [str(n) for n in task["label_names"]] if task.get("label_names") else None
