"""Quantization parameters of one bit configuration: per layer, the weight scales (per output
channel, or per block of input columns) and the input activation scale (per tensor, the global
scale of a dynamically block-quantized input, or none for weight-only layers). A layer's grids
are its kind's in the configuration (BitConfig.for_kind: nvfp4's convolutions are fp8). Saved
as safetensors + JSON and read back by the fake-quant model and the ONNX QDQ exporter alike."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptqd.calibration.configs import BitConfig, is_kept
from ptqd.calibration.data import CalibrationData
from ptqd.calibration.layers import layer_kind, quantizable_layers
from ptqd.quant_math import (E4M3, Grid, IntGrid, activation_scale, block_weight_scales, dequantize, expand_blocks,
                             fake_quantize, fake_quantize_dynamic, fp16_global, quantize, scale_for_range,
                             weight_scales)

PARAMS_TENSORS = "quant_params.safetensors"
PARAMS_JSON = "quant_params.json"


@dataclass
class LayerQuant:
    # [out_channels] float32, or per block [out, in / block]: float32, or the block scales'
    # E4M3 values under weight_global (NVFP4)
    weight_scale: torch.Tensor
    # [] float32: the input's per-tensor scale, or the global scale of its run-time block
    # scales (NVFP4); None: the input stays float (weight-only)
    act_scale: torch.Tensor | None
    # 8-bit scale of the layer's output, used only by the CPU-fast ONNX Runtime graph, which
    # must quantize outputs for onnxruntime to fuse QLinearConv/QLinearMatMul
    output_scale: torch.Tensor | None = None
    # the weight's grid values as GPTQ chose them (the weight's shape; int8 for integer grids,
    # float8_e4m3fn for FP8 and FP4); None: nearest rounding
    weight_int: torch.Tensor | None = None
    weight_global: torch.Tensor | None = None   # [] float32: the block scales' global scale

    def to(self, device) -> "LayerQuant":
        move = lambda t: None if t is None else t.to(device)
        return LayerQuant(move(self.weight_scale), move(self.act_scale), move(self.output_scale),
                          move(self.weight_int), move(self.weight_global))

    def dequant_scale(self) -> torch.Tensor:
        """What the weight's grid values are multiplied by: the scales, or (two-level block
        scales) their E4M3 values times the global scale, as the graph's DQ of the scales does."""
        scale = self.weight_scale.to(torch.float32)
        return scale if self.weight_global is None else scale * self.weight_global.to(scale.device, torch.float32)

    def weight_scale_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The scale of every element of the weight, [out, columns] (columns: in_features, or
        a convolution's in_channels x kh x kw)."""
        scale = self.dequant_scale().to(weight.device)
        rows = weight.shape[0]
        columns = weight[0].numel()
        if scale.dim() == 2:
            return expand_blocks(scale, columns // scale.shape[1])
        return scale.reshape(rows, 1).expand(rows, columns)

    def weight_integers(self, weight: torch.Tensor, grid: Grid) -> torch.Tensor:
        """The grid values every graph flavour and the fake-quant model use (float, [out, ...]
        like the torch weight)."""
        if self.weight_int is not None:
            return self.weight_int.to(torch.float32)
        if self.weight_scale.dim() == 2:
            flat = weight.detach().reshape(weight.shape[0], -1)
            return quantize(flat, self.weight_scale_matrix(flat), grid).reshape(weight.shape)
        return quantize(weight.detach(), self.weight_scale, grid, axis=0)

    def dequantized_weight(self, weight: torch.Tensor, grid: Grid) -> torch.Tensor:
        integers = self.weight_integers(weight, grid)
        if self.weight_scale.dim() == 2:
            flat = integers.reshape(weight.shape[0], -1)
            return dequantize(flat, self.weight_scale_matrix(flat)).reshape(weight.shape)
        return dequantize(integers, self.weight_scale, axis=0)


def quantize_input(x: torch.Tensor, lq: LayerQuant, config: BitConfig) -> torch.Tensor:
    """A layer's input as the quantized model feeds it; `config` is the layer's own (its kind's,
    BitConfig.for_kind)."""
    layout = config.act_layout
    if layout is None:
        return x
    if layout.granularity == "dynamic-block":
        return fake_quantize_dynamic(x, lq.act_scale, config.act_grid, layout.block)
    return fake_quantize(x, lq.act_scale, config.act_grid)


@dataclass
class ConfigQuant:
    config: BitConfig
    layers: dict[str, LayerQuant] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    weight_rounding: str = "nearest"   # or "gptq" (calibration.gptq)


def calibrate_config(unet, config: BitConfig, data: CalibrationData, keep: tuple[str, ...],
                     searched: dict | None = None) -> ConfigQuant:
    """Scales of every layer not kept, each on its kind's grids in the configuration; the float
    configuration (fp16) keeps every layer, and a layer whose kind takes no quantized format
    in it (w4a16's convolutions) or whose input width is no whole number of its blocks stays
    float too. `searched` (shared between the configurations of one calibration) holds each
    scale search by (tensor, grid): configurations on the same grid get the same scale,
    searched once."""
    searched = {} if searched is None else searched

    def search(key, values, absmax, grid):
        if (key, grid) not in searched:
            searched[key, grid] = activation_scale(values, absmax, grid).reshape(())
        return searched[key, grid].clone()   # safetensors stores no tensor twice

    result = ConfigQuant(config)
    for name, module in quantizable_layers(unet).items():
        layer_config = config.for_kind(layer_kind(module))
        if is_kept(name, keep) or not fits_blocks(module, layer_config):
            result.kept.append(name)
            continue
        wlayout, alayout = layer_config.weight_layout, layer_config.act_layout
        wgrid, agrid = layer_config.weight_grid, layer_config.act_grid
        weight_global = act_scale = output_scale = None
        if wlayout.blocked:
            weight_scale, weight_global = block_weight_scales(
                module.weight, wgrid, wlayout.block, E4M3 if wlayout.scale == "e4m3" else None)
        else:
            weight_scale = weight_scales(module.weight, wgrid)
        if alayout is not None and alayout.granularity == "dynamic-block":
            # the global scale maps the calibrated maximum onto the top of the block-scale grid
            act_scale = fp16_global(scale_for_range(torch.tensor(data.act_absmax[name] / agrid.qmax), E4M3)).reshape(())
        elif alayout is not None:
            act_scale = search(name, data.act_values[name], data.act_absmax[name], agrid)
            output_scale = search(f"{name}:out", data.out_values[name], data.out_absmax[name], IntGrid(8))
        result.layers[name] = LayerQuant(weight_scale, act_scale, output_scale, weight_global=weight_global)
    return result


def fits_blocks(module, config: BitConfig) -> bool:
    """Whether a layer's input width is a whole number of the configuration's weight blocks."""
    return config.quantizes(layer_kind(module), module.weight[0].numel())


def granularity(config: BitConfig) -> tuple[str, str]:
    """(weight, activation) granularity in words, per layer kind where kinds differ."""
    def words(kind):
        layer = config.for_kind(kind)
        w, a = layer.weight_layout, layer.act_layout
        if w is None:
            return "float", "float"
        weight = (f"per-block({w.block} input columns" + (", e4m3 scales x fp32 global)" if w.scale == "e4m3" else ")")
                  if w.blocked else "per-channel(axis=0)")
        act = ("none (weight-only)" if a is None else
               f"dynamic per-block({a.block} along the last axis, e4m3 scales x calibrated fp32 global)"
               if a.granularity == "dynamic-block" else "per-tensor")
        return weight, act
    linear, conv = words("linear"), words("conv")
    if linear == conv:
        return linear
    return tuple(f"linear: {lw}; conv: {cw}" for lw, cw in zip(linear, conv))


def save_params(folder: Path, quants: list[ConfigQuant], keep: tuple[str, ...]) -> None:
    from safetensors.torch import save_file

    tensors, doc = {}, {"format_version": 1, "keep_patterns": list(keep), "configs": {}}
    for q in quants:
        name = q.config.name
        for layer, lq in q.layers.items():
            lq = lq.to("cpu")   # calibrated on --device; saved for every stage after it
            tensors[f"{name}/{layer}/weight_scale"] = lq.weight_scale.contiguous()
            if lq.act_scale is not None:
                tensors[f"{name}/{layer}/act_scale"] = lq.act_scale.contiguous()
            if lq.weight_global is not None:
                tensors[f"{name}/{layer}/weight_global"] = lq.weight_global.contiguous()
            if lq.output_scale is not None:
                tensors[f"{name}/{layer}/output_scale"] = lq.output_scale.contiguous()
            if lq.weight_int is not None:
                # in its grid's storage type (int8; E4M3 for FP8 and FP4, which it holds exactly)
                tensors[f"{name}/{layer}/weight_int"] = lq.weight_int.contiguous()
        weight_words, act_words = granularity(q.config)
        doc["configs"][name] = {"weight_bits": q.config.weight_bits, "act_bits": q.config.act_bits,
                                "format": q.config.fmt,
                                "weight_rounding": q.weight_rounding,
                                "weight_granularity": weight_words,
                                "act_granularity": act_words, "zero_point": 0,
                                "quantized_layers": sorted(q.layers), "kept_layers": sorted(q.kept)}
    save_file(tensors, str(folder / PARAMS_TENSORS))
    (folder / PARAMS_JSON).write_text(json.dumps(doc, indent=1) + "\n")


def load_params(folder: Path) -> dict[str, ConfigQuant]:
    from safetensors.torch import load_file

    from safetensors import SafetensorError

    from ptqd.errors import UserError

    try:
        doc = json.loads((folder / PARAMS_JSON).read_text())
        tensors = load_file(str(folder / PARAMS_TENSORS))
    except (OSError, ValueError, SafetensorError) as exc:  # missing, bad JSON, damaged tensors
        raise UserError(f"{folder}: quantization parameters do not load ({type(exc).__name__}); "
                        "recalibrate, or check the output with `ptqd verify`") from None
    out = {}
    for name, meta in doc["configs"].items():
        q = ConfigQuant(BitConfig(meta["weight_bits"], meta["act_bits"], meta.get("format", "int")),
                        kept=list(meta["kept_layers"]),
                        weight_rounding=meta.get("weight_rounding", "nearest"))
        for layer in meta["quantized_layers"]:
            q.layers[layer] = LayerQuant(tensors[f"{name}/{layer}/weight_scale"],
                                         tensors.get(f"{name}/{layer}/act_scale"),
                                         tensors.get(f"{name}/{layer}/output_scale"),
                                         tensors.get(f"{name}/{layer}/weight_int"),
                                         tensors.get(f"{name}/{layer}/weight_global"))
        out[name] = q
    return out
