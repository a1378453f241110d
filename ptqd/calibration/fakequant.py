"""The PyTorch fake-quant UNet: float kernels fed the exact values a QDQ graph computes."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ptqd.calibration.configs import BitConfig
from ptqd.calibration.layers import layer_kind
from ptqd.calibration.params import ConfigQuant, LayerQuant, quantize_input


class FakeQuantLayer(nn.Module):
    """Conv2d or Linear with its input and weight fake-quantized as its configuration says
    (`config` is the layer's own: its kind's in the configuration)."""

    def __init__(self, layer: nn.Module, lq: LayerQuant, config: BitConfig):
        super().__init__()
        self.layer = layer
        self.config = config
        self.lq = lq.to(layer.weight.device)   # parameters may come from the CPU (a saved calibration)
        self.act_grid = config.act_grid
        self.register_buffer("weight_q", self.lq.dequantized_weight(layer.weight, config.weight_grid))

    @property
    def act_scale(self):
        return self.lq.act_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_input(x, self.lq, self.config)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, self.weight_q, self.layer.bias)
        return F.linear(x, self.weight_q, self.layer.bias)


def fake_quant_unet(unet: nn.Module, quant: ConfigQuant) -> nn.Module:
    """A copy of `unet` with every calibrated layer replaced; the original is untouched. The
    copy shares the original's parameters and buffers (nothing trains or moves them): it holds
    only the dequantized weights of its own, not a second FP32 model beside them (an SDXL
    UNet's weights are 10 GB)."""
    shared = {id(t): t for t in (*unet.parameters(), *unet.buffers())}
    model = copy.deepcopy(unet, memo=shared)
    for name, lq in quant.layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        setattr(parent, child, FakeQuantLayer(layer, lq, quant.config.for_kind(layer_kind(layer))))
    return model.eval()
