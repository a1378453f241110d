"""Activation statistics in bounded memory: however many UNet calls the trajectories make,
each layer input and output keeps at most VALUES_PER_LAYER sampled values."""
import torch

from ptqd.calibration.data import VALUES_PER_CALL, VALUES_PER_LAYER, ActivationObserver
from ptqd.calibration.layers import quantizable_layers


def _observe(unet, calls: int) -> dict[str, torch.Tensor]:
    layers = [n for n in quantizable_layers(unet) if n.endswith(".conv1")][:3]   # inputs > VALUES_PER_CALL
    observer = ActivationObserver(unet, layers, seed=0, calls=calls)
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(calls):
            unet(x, torch.full((8,), 500.0))
    values, absmax = observer.close()
    assert set(absmax) == set(values) and all(m > 0 for m in absmax.values())
    return values


def test_sampled_values_stop_growing_at_the_per_layer_budget(builtin_unet):
    few = _observe(builtin_unet, 4)
    assert all(v.numel() == 4 * VALUES_PER_CALL for v in few.values())
    many = _observe(builtin_unet, 2 * VALUES_PER_LAYER // VALUES_PER_CALL)   # twice the defaults' calls
    sizes = {v.numel() for v in many.values()}
    assert max(sizes) <= VALUES_PER_LAYER and min(sizes) >= VALUES_PER_LAYER * 0.99, sizes
    # every call contributed: the last call's share is filled too
    assert all(torch.isfinite(v).all() for v in many.values())
