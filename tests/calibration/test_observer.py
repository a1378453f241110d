"""Calibration in bounded memory: however many UNet calls the trajectories make, each layer
input and output keeps at most VALUES_PER_LAYER sampled values, and no probe call exceeds
--calib-batch."""
import torch

from ptqd.calibration.data import VALUES_PER_CALL, VALUES_PER_LAYER, ActivationObserver, Probe, _probe_groups
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


def test_probe_calls_never_exceed_the_calibration_batch():
    """--calib-batch bounds the probe calls too (GPTQ, sensitivity): blocks larger than it are
    split into contiguous parts, smaller ones share a call."""
    blocks = [Probe(0, 0, 5), Probe(1, 5, 5), Probe(2, 3, 7)]
    groups = list(_probe_groups(blocks, 4))
    assert all(sum(p.count for p in g) <= 4 for g in groups)
    parts = [p for g in groups for p in g]
    for b in blocks:
        mine = [p for p in parts if p.step == b.step]
        assert [p.start for p in mine] == list(range(b.start, b.start + b.count, 4))
        assert sum(p.count for p in mine) == b.count
    assert list(_probe_groups(blocks, 64)) == [blocks]
