"""dpq.cost on converted low-bit layers: what a backend holds and stores is what is counted."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpq import cost
from dpq.quant import QuantConfig, convert_
from dpq.quant.bnb import BnbLinear
from dpq.quant.cpu_int8 import Int8Conv2d, Int8Linear


class SmallCNN(nn.Module):
    """A conv and a linear to quantize, then a float head; called as model(pixel_values=...)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 32)
        self.head = nn.Linear(32, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(pixel_values)).flatten(1)
        return self.head(F.relu(self.fc(h)))


def test_cpu_int8_flop_count_leaves_no_float_weight_behind():
    """fvcore's trace runs the float path; a dequantized copy it kept was counted as resident memory
    (4 B per quantized weight) by every peak_memory after it, though the int8 kernel never reads it."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    convert_(model, QuantConfig(bits=8, targets=r"re:conv|fc"), backend="cpu_int8")
    assert isinstance(model.conv, Int8Conv2d) and isinstance(model.fc, Int8Linear)
    x = {"pixel_values": torch.randn(2, 3, 6, 6)}

    def resident(out):
        return out["peak_memory_bytes"] - out["peak_activation_bytes"]

    def caches():
        return [tuple(t.shape) for m in (model.conv, model.fc) for t in m.inference_caches()]

    before, kept = cost.peak_memory(model, x), caches()
    fl = cost.flops(model, x)
    assert fl["linear_dense_gflops"] > 0  # the traced float path did run
    assert caches() == kept
    assert resident(cost.peak_memory(model, x)) == resident(before)


def test_bias_of_a_layer_that_keeps_it_inside_is_counted():
    """A quantized wrapper without a ``bias`` attribute (its bias in an inner module) still has its bias
    counted, through ``float_bias()``: the parameter walk skips every tensor the layer owns."""

    class Wrapped(nn.Module):
        def __init__(self, lin: nn.Linear) -> None:
            super().__init__()
            self.inner, self.in_features, self.out_features = lin, lin.in_features, lin.out_features

        def dequantize(self):
            return self.inner.weight.detach()

        def nonzero_weights(self):
            return int(torch.count_nonzero(self.inner.weight))

        def storage_bytes(self):
            return 0

        def float_bias(self):
            return self.inner.bias.detach().float()

    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    assert cost.parameter_counts(nn.Sequential(Wrapped(lin))) == cost.parameter_counts(nn.Sequential(lin))


def test_bnb_linear_shows_its_inner_bias():
    """bitsandbytes' layer holds the bias; the wrapper exposes it as torchao's does (no GPU needed to
    build the wrapper around a plain Linear, which stands in for bnb's layer)."""
    lin = nn.Linear(16, 8)
    q = BnbLinear(lin, "int8")
    assert q.bias is lin.bias and cost._bias_tensor(q) is lin.bias
    assert BnbLinear(nn.Linear(16, 8, bias=False), "int8").bias is None


def test_torchao_weights_count_as_resident_int8_codes_not_float32():
    """torchao keeps a weight as an ``Int8Tensor`` whose reported dtype is float32 (4 B per element);
    resident memory is what it holds: int8 codes, scales, zero points, as ``size_bytes`` counts them."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = {"pixel_values": torch.randn(2, 3, 6, 6)}
    float_resident = cost._resident_bytes(model, x)
    convert_(model, QuantConfig(bits=8, targets="fc"), backend="torchao", scheme="int8_weight_only")
    stored = model.fc.storage_bytes()  # codes + per-row scales and zero points + float bias
    fc_float = (8 * 6 * 6 * 32 + 32) * 4
    assert model.fc.inner.weight.element_size() == 4  # the subclass reports its logical dtype
    assert cost._resident_bytes(model, x) == float_resident - fc_float + stored
    assert stored < fc_float / 3
