"""Quantization parameters of one bit configuration: per layer, the per-output-channel
weight scales and the per-tensor input activation scale. Saved as safetensors + JSON and
read back by the fake-quant model and the ONNX QDQ exporter alike."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptqd.calibration.configs import BitConfig, is_kept
from ptqd.calibration.data import CalibrationData
from ptqd.calibration.layers import quantizable_layers
from ptqd.quant_math import Grid, IntGrid, activation_scale, quantize, weight_scales

PARAMS_TENSORS = "quant_params.safetensors"
PARAMS_JSON = "quant_params.json"


@dataclass
class LayerQuant:
    weight_scale: torch.Tensor   # [out_channels] float32
    act_scale: torch.Tensor      # [] float32
    # 8-bit scale of the layer's output, used only by the CPU-fast ONNX Runtime graph, which
    # must quantize outputs for onnxruntime to fuse QLinearConv/QLinearMatMul
    output_scale: torch.Tensor | None = None
    # the weight's grid values as GPTQ chose them (the weight's shape; int8 for integer grids,
    # float8_e4m3fn for FP8); None: nearest rounding
    weight_int: torch.Tensor | None = None

    def to(self, device) -> "LayerQuant":
        move = lambda t: None if t is None else t.to(device)
        return LayerQuant(move(self.weight_scale), move(self.act_scale), move(self.output_scale),
                          move(self.weight_int))

    def weight_integers(self, weight: torch.Tensor, grid: Grid) -> torch.Tensor:
        """The integers every graph flavour and the fake-quant model use (float grid values,
        [out, ...] like the torch weight)."""
        if self.weight_int is not None:
            return self.weight_int.to(torch.float32)
        return quantize(weight.detach(), self.weight_scale, grid, axis=0)


@dataclass
class ConfigQuant:
    config: BitConfig
    layers: dict[str, LayerQuant] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    weight_rounding: str = "nearest"   # or "gptq" (calibration.gptq)


def calibrate_config(unet, config: BitConfig, data: CalibrationData, keep: tuple[str, ...],
                     searched: dict | None = None) -> ConfigQuant:
    """Scales of every layer not kept; the float configuration (fp16) keeps every layer.
    `searched` (shared between the configurations of one calibration) holds each scale search
    by (tensor, grid): configurations on the same grid get the same scale, searched once."""
    wgrid, agrid = config.weight_grid, config.act_grid
    searched = {} if searched is None else searched

    def search(key, values, absmax, grid):
        if (key, grid) not in searched:
            searched[key, grid] = activation_scale(values, absmax, grid).reshape(())
        return searched[key, grid].clone()   # safetensors stores no tensor twice

    result = ConfigQuant(config)
    for name, module in quantizable_layers(unet).items():
        if not config.quantized or is_kept(name, keep):
            result.kept.append(name)
            continue
        result.layers[name] = LayerQuant(
            weight_scale=weight_scales(module.weight, wgrid),
            act_scale=search(name, data.act_values[name], data.act_absmax[name], agrid),
            output_scale=search(f"{name}:out", data.out_values[name], data.out_absmax[name], IntGrid(8)))
    return result


def save_params(folder: Path, quants: list[ConfigQuant], keep: tuple[str, ...]) -> None:
    from safetensors.torch import save_file

    tensors, doc = {}, {"format_version": 1, "keep_patterns": list(keep), "configs": {}}
    for q in quants:
        name = q.config.name
        for layer, lq in q.layers.items():
            lq = lq.to("cpu")   # calibrated on --device; saved for every stage after it
            tensors[f"{name}/{layer}/weight_scale"] = lq.weight_scale.contiguous()
            tensors[f"{name}/{layer}/act_scale"] = lq.act_scale.contiguous()
            if lq.output_scale is not None:
                tensors[f"{name}/{layer}/output_scale"] = lq.output_scale.contiguous()
            if lq.weight_int is not None:
                tensors[f"{name}/{layer}/weight_int"] = lq.weight_int.to(q.config.weight_grid.storage).contiguous()
        doc["configs"][name] = {"weight_bits": q.config.weight_bits, "act_bits": q.config.act_bits,
                                "format": q.config.fmt,
                                "weight_rounding": q.weight_rounding,
                                "weight_granularity": "per-channel(axis=0)",
                                "act_granularity": "per-tensor", "zero_point": 0,
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
                                         tensors[f"{name}/{layer}/act_scale"],
                                         tensors.get(f"{name}/{layer}/output_scale"),
                                         tensors.get(f"{name}/{layer}/weight_int"))
        out[name] = q
    return out
