"""GPTQ weight reconstruction (Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023) on ptqd's weight grids.

Nearest rounding leaves every weight's rounding error for PTQD's correction to absorb. GPTQ
rounds one input column at a time and spreads each column's error over the columns not yet
rounded, weighted by the inverse Hessian of the layer's inputs, H = 2 X X^T / n, so the
layer's output on its calibration inputs moves as little as it can:

    for each column j:  q_j = round(w_j / s_j) (s_j: the column's scales, per output channel or
                        its block's, fixed before GPTQ runs: "static groups")
                        w_{>j} -= (w_j - s q_j) / [H^-1]_jj * [H^-1]_{j,>j}

with the upper Cholesky factor of the damped inverse (damping 1 % of the mean diagonal) and
columns processed in blocks whose error is pushed to the rest in one matrix product (the
"lazy batch" update). The scales are the clipping search's (quant_math, per channel or per
block of input columns), so the grid values GPTQ picks drop into the same QDQ graphs and the
same fake-quant model.

X is what the quantized model feeds the layer: its calibration input, quantized as the layer's
input is (params.quantize_input: per tensor, per run-time block, or not at all for weight-only
layers); convolutions see it unfolded (im2col), so H is over the weight's
in_channels x kh x kw columns. Hessians are built from streamed forward passes, as many
layers at a time as fit a memory budget, never all of a large UNet's at once.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ptqd.calibration.configs import BitConfig
from ptqd.calibration.layers import layer_kind, quantizable_layers
from ptqd.calibration.params import ConfigQuant, LayerQuant, quantize_input
from ptqd.quant_math import Grid, quantize

DAMP = 0.01
BLOCK = 128
# Hessians held at once; one pass over the probe inputs fills a group of layers within it
HESSIAN_BUDGET_BYTES = 1 << 30


def hessian_columns(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return module.in_features


def layer_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the columns its weight multiplies: [d, samples]."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)                  # [N, C*kh*kw, L]
        return cols.transpose(0, 1).reshape(cols.shape[1], -1)
    return x.reshape(-1, x.shape[-1]).t()


class HessianAccumulator:
    """Running H = 2 X X^T / n of one layer's inputs, quantized as the quantized model feeds
    them (`lq`, `config`: the layer's parameters and its own configuration)."""

    def __init__(self, module: nn.Module, lq: LayerQuant, config: BitConfig):
        d = hessian_columns(module)
        self.module, self.lq, self.config = module, lq, config
        self.h = torch.zeros(d, d, dtype=torch.float32, device=module.weight.device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = quantize_input(x.detach().to(torch.float32), self.lq, self.config)
        cols = layer_columns(self.module, x)
        m = cols.shape[1]
        self.h.mul_(self.n / (self.n + m))
        cols = cols * math.sqrt(2.0 / (self.n + m))
        self.h.addmm_(cols, cols.t())
        self.n += m


def layer_groups(sizes: dict[str, int], budget: int = HESSIAN_BUDGET_BYTES) -> list[list[str]]:
    """Layers in order, grouped so each group's float32 Hessians fit the budget (a layer
    larger than the budget alone is a group of its own)."""
    groups, current, used = [], [], 0
    for name, d in sizes.items():
        nbytes = 4 * d * d
        if current and used + nbytes > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    return groups + ([current] if current else [])


def collect_hessians(modules: dict[str, nn.Module], inputs: dict[str, tuple[LayerQuant, BitConfig]],
                     run_probes: Callable[[], None], budget: int = HESSIAN_BUDGET_BYTES
                     ) -> Iterable[tuple[str, torch.Tensor]]:
    """(layer, H) for every layer of `modules`, its inputs quantized as `inputs[layer]` says,
    group by group: each group's hooks record while `run_probes()` drives the model over the
    calibration probes once."""
    sizes = {name: hessian_columns(m) for name, m in modules.items()}
    for group in layer_groups(sizes, budget):
        accs = {name: HessianAccumulator(modules[name], *inputs[name]) for name in group}
        hooks = [modules[name].register_forward_pre_hook(lambda mod, inputs, a=accs[name]: a.add(inputs[0]))
                 for name in group]
        try:
            with torch.no_grad():
                run_probes()
        finally:
            for h in hooks:
                h.remove()
        for name in group:
            yield name, accs.pop(name).h


def gptq_integers(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, grid: Grid,
                  damp: float = DAMP, block: int = BLOCK) -> torch.Tensor:
    """The grid values GPTQ picks for `weight` ([out, ...]; `scale` per output channel [out],
    or per element [out, columns]: LayerQuant.weight_scale_matrix), in the weight's shape, as
    a float tensor (like quant_math.quantize)."""
    shape = weight.shape
    w = weight.detach().to(torch.float32).reshape(shape[0], -1).clone()
    h = hessian.clone().to(torch.float32)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s = scale.to(torch.float32)
    s = s.reshape(-1, 1).expand_as(w) if s.dim() == 1 else s.reshape(w.shape)
    q = torch.zeros_like(w)
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col, col_scale = w1[:, i], s[:, i1 + i].contiguous()
            qcol = quantize(col, col_scale, grid, axis=0)
            q[:, i1 + i] = qcol
            err = (col - qcol * col_scale) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q.reshape(shape)


def output_error(weight: torch.Tensor, integers: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) / 2 = |dW X|^2 / n: the layer's squared output error per input column on
    its calibration inputs, summed over output channels (what GPTQ minimises); `scale` as
    gptq_integers takes it."""
    w = weight.detach().to(torch.float32).reshape(weight.shape[0], -1)
    s = scale.to(torch.float32)
    dw = w - integers.reshape(w.shape) * (s.reshape(-1, 1) if s.dim() == 1 else s.reshape(w.shape))
    return float(((dw @ hessian) * dw).sum() / 2)


def reconstruct_weights(unet: nn.Module, quants: list[ConfigQuant], run_probes: Callable[[], None],
                        budget: int = HESSIAN_BUDGET_BYTES) -> None:
    """GPTQ's grid values for every quantized layer of every configuration, in place
    (LayerQuant.weight_int). A layer's Hessian is shared by the configurations that feed it
    the same input: the same activation grid and layout (their scales are calibrated per
    grid, so they are the same), or float input for weight-only layers. The float
    configuration (fp16, no layers) has nothing to reconstruct."""
    modules = quantizable_layers(unet)
    order = {name: i for i, name in enumerate(modules)}
    # input quantization -> layer -> the (configuration, layer parameters) that share it
    by_input: dict = {}
    for q in quants:
        for name, lq in q.layers.items():
            config = q.config.for_kind(layer_kind(modules[name]))
            key = (config.act_grid, config.act_layout)
            by_input.setdefault(key, {}).setdefault(name, []).append((config, lq))
    for users in by_input.values():
        # grouped convolutions have per-group Hessians; ptqd's UNets have none, and they keep nearest rounding
        names = sorted((n for n in users if getattr(modules[n], "groups", 1) == 1), key=order.__getitem__)
        inputs = {n: (users[n][0][1], users[n][0][0]) for n in names}
        hessians = collect_hessians({n: modules[n] for n in names}, inputs, run_probes, budget)
        for name, hessian in hessians:
            weight = modules[name].weight
            for config, lq in users[name]:
                grid = config.weight_grid
                scale = lq.weight_scale_matrix(weight.reshape(weight.shape[0], -1))
                integers = gptq_integers(weight, hessian, scale, grid)
                lq.weight_int = integers.to(grid.storage)
    for q in quants:
        if q.layers:
            q.weight_rounding = "gptq"

