"""Per-layer sensitivity: how much each quantized layer alone adds to the UNet's prediction
error, the map a user reads to choose `--keep` patterns.

Computed on calibration probes (recorded x_t across the steps, with their full-precision eps):
for each layer, only that layer is swapped for its fake-quant twin (the base configuration,
after weight reconstruction), and the step-averaged mean squared error of eps against the
full-precision eps is the layer's sensitivity. Errors of different layers do not add exactly
(they interact through the network), so the all-layers error is recorded beside them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ptqd.calibration.data import CalibrationData, Probe, probe_predictions
from ptqd.calibration.fakequant import FakeQuantLayer
from ptqd.calibration.layers import LayerInfo, layer_kind
from ptqd.calibration.params import ConfigQuant

SENSITIVITY_JSON = "sensitivity.json"
# 32 recorded inputs over 8 steps (4 per step): one UNet call of 32 per layer keeps the map
# cheap; at the defaults it ranks the built-in model's top layers as 64 inputs did
SENSITIVITY_PROBES, SENSITIVITY_STEPS = 32, 8


def probe_mse(unet, data: CalibrationData, probes: list[Probe], conditioner=None) -> float:
    """Mean squared error of the model's eps against the recorded full-precision eps."""
    total, count = 0.0, 0
    for p, eps in probe_predictions(unet, data, probes, conditioner):
        total += float(((torch.from_numpy(eps) - data.eps[p.step, p.start:p.start + p.count]) ** 2).sum())
        count += eps.size
    return total / count


def _swap(unet, name: str, module) -> torch.nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = unet.get_submodule(parent_name) if parent_name else unet
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


@torch.no_grad()
def layer_sensitivity(unet, quant: ConfigQuant, data: CalibrationData, probes: list[Probe],
                      layers: list[LayerInfo], conditioner=None, all_layers_mse: float | None = None) -> dict:
    """{config, probes, all_layers_mse, layers: [{layer, kind, mse, macs_share}] sorted by mse}."""
    macs = {info.name: info.macs for info in layers}
    total_macs = sum(macs.values())
    rows = []
    for name, lq in quant.layers.items():
        original = unet.get_submodule(name)
        # the layer on its own kind's grids (nvfp4's convolutions are fp8)
        _swap(unet, name, FakeQuantLayer(original, lq, quant.config.for_kind(layer_kind(original))))
        try:
            mse = probe_mse(unet, data, probes, conditioner)
        finally:
            _swap(unet, name, original)
        rows.append({"layer": name, "kind": layer_kind(original),
                     "mse": mse, "macs_share": macs.get(name, 0) / total_macs if total_macs else 0.0})
    rows.sort(key=lambda r: -r["mse"])
    return {"config": quant.config.name, "probes": sum(p.count for p in probes),
            "method": "only this layer fake-quantized; mean squared error of eps against the FP eps "
                      "on calibration probes spread over the steps",
            "all_layers_mse": all_layers_mse, "layers": rows}


def write_sensitivity(folder: Path, doc: dict) -> Path:
    path = Path(folder) / SENSITIVITY_JSON
    path.write_text(json.dumps({"format_version": 1, **doc}, indent=1) + "\n")
    return path
