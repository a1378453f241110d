"""The UNet's quantizable layers (Conv2d and Linear) and their multiply-accumulate counts."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

QUANTIZABLE = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str       # "conv" or "linear"
    macs: int       # per sample, at the model's native resolution


def quantizable_layers(unet: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, QUANTIZABLE)}


@torch.no_grad()
def measure_layers(unet: nn.Module, sample_shape: tuple[int, ...],
                   conditioning: dict | None = None) -> list[LayerInfo]:
    """MACs per sample of every Conv2d/Linear, measured by running the model once (with one
    sample's conditioning inputs for a conditional model)."""
    infos: dict[str, LayerInfo] = {}
    hooks = []
    for name, module in quantizable_layers(unet).items():
        def hook(mod, inputs, output, name=name):
            out = output[0] if output.dim() > 1 else output
            if isinstance(mod, nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
                infos[name] = LayerInfo(name, "conv", int(out.numel() * k))
            else:
                infos[name] = LayerInfo(name, "linear", int(out.numel() * mod.in_features))
        hooks.append(module.register_forward_hook(hook))
    try:
        extra = {k: torch.from_numpy(v[:1]) for k, v in (conditioning or {}).items()}
        unet(torch.zeros(1, *sample_shape), torch.tensor([500.0]), **extra)
    finally:
        for h in hooks:
            h.remove()
    return [infos[name] for name in quantizable_layers(unet) if name in infos]
