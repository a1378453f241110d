"""GPTQ weight reconstruction: what it minimises, that it does, and that its integers are the
ones every graph flavour and the fake-quant model use."""
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from ptqd.calibration.gptq import (collect_hessians, gptq_integers, layer_columns, layer_groups, output_error)
from ptqd.calibration.configs import BitConfig
from ptqd.calibration.params import LayerQuant, load_params
from ptqd.quant_math import E4M3, IntGrid, quantize, weight_scales
from ptqd.runtime.layout import GRAPH_FILES, graph_path


def _hessian(cols: torch.Tensor) -> torch.Tensor:
    return 2 * cols @ cols.t() / cols.shape[1]


def test_conv_hessian_measures_the_convolutions_own_output_error():
    """tr(dW H dW^T)/2 from the unfolded inputs equals the mean squared output of the
    convolution by dW: the im2col columns are ordered as the weight's (C, kh, kw)."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    x = torch.randn(3, 6, 9, 9, generator=gen)
    dw = torch.randn(5, 6, 3, 3, generator=gen)
    h = _hessian(layer_columns(conv, x))
    direct = F.conv2d(x, dw, stride=2, padding=1).pow(2).sum(dim=1).mean()
    assert output_error(dw, torch.zeros_like(dw), torch.ones(5), h) == pytest.approx(float(direct), rel=1e-4)


@pytest.mark.parametrize("bits", [4, 8, "fp8"])
def test_gptq_lowers_the_layer_output_error_on_correlated_inputs(bits):
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(64, 64, generator=gen)
    x = torch.randn(4096, 64, generator=gen) @ mix      # strongly correlated input features
    weight = torch.randn(32, 64, generator=gen)
    grid = E4M3 if bits == "fp8" else IntGrid(bits)
    scale = weight_scales(weight, grid)
    h = _hessian(layer_columns(nn.Linear(64, 32), x))
    nearest = quantize(weight, scale, grid, axis=0)
    gptq = gptq_integers(weight, h, scale, grid)
    assert gptq.min() >= grid.qmin and gptq.max() <= grid.qmax
    assert torch.equal(gptq, grid.round_(gptq.clone()))   # on the grid: integers, or E4M3 values
    assert (gptq != nearest).any()
    assert output_error(weight, gptq, scale, h) < 0.7 * output_error(weight, nearest, scale, h)


def test_gptq_is_nearest_rounding_when_inputs_are_uncorrelated():
    """A diagonal Hessian gives no other column to move an error to."""
    weight = torch.randn(16, 40, generator=torch.Generator().manual_seed(2))
    grid = IntGrid(4)
    scale = weight_scales(weight, grid)
    h = torch.diag(torch.rand(40, generator=torch.Generator().manual_seed(3)) + 0.5)
    assert torch.equal(gptq_integers(weight, h, scale, grid), quantize(weight, scale, grid, axis=0))


def test_hessians_streamed_in_small_groups_equal_one_pass():
    """Bounded memory: a budget that fits one layer's Hessian at a time gives the same Hessians."""
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10))
    modules = {"0": model[0], "2": model[2], "4": model[4]}
    w8a8 = BitConfig.parse("w8a8")
    inputs = {name: (LayerQuant(torch.ones(1), torch.tensor(0.05)), w8a8) for name in modules}
    batches = [torch.randn(4, 3, 6, 6, generator=gen) for _ in range(3)]
    passes = []

    def run():
        passes.append(1)
        for b in batches:
            model(b)

    one = dict(collect_hessians(modules, inputs, run, budget=1 << 30))
    assert len(passes) == 1
    small = dict(collect_hessians(modules, inputs, run, budget=4 * 27 * 27))
    assert len(passes) == 1 + 3
    assert layer_groups({"a": 10, "b": 10, "c": 20}, budget=4 * 250) == [["a", "b"], ["c"]]
    for name in modules:
        torch.testing.assert_close(small[name], one[name])


def test_export_uses_gptq_integers_in_every_flavour(exported):
    """The default 4-bit export reconstructs every configuration's weights with GPTQ, records it,
    and its graphs carry exactly those integers (the fake-quant twin uses them too: the
    each-layer-alone and whole-graph tests in tests/exporter/test_export.py)."""
    doc = json.loads((exported / "calibration" / "ptqd.json").read_text())
    assert doc["weight_rounding"]["method"] == "gptq"
    params = load_params(exported / "calibration")
    for cfg, quant in params.items():
        assert quant.weight_rounding == "gptq"
        assert all(lq.weight_int is not None for lq in quant.layers.values()), cfg
        for path in {graph_path(exported / "onnx", cfg, f) for f in GRAPH_FILES}:
            inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
            layer = "down_blocks.1.resnets.0.conv1"
            # grid values: integers, or E4M3 values for fp8 (exact in float32 either way)
            graph = numpy_helper.to_array(inits[f"{layer}/weight_quant/quantized"]).astype(np.float32)
            assert np.array_equal(graph, quant.layers[layer].weight_int.to(torch.float32).numpy()), path.name
    sensitivity = json.loads((exported / "calibration" / "sensitivity.json").read_text())
    rows = sensitivity["layers"]
    assert {r["layer"] for r in rows} == set(params[doc["base_config"]].layers)
    assert [r["mse"] for r in rows] == sorted((r["mse"] for r in rows), reverse=True)
    assert 0 < rows[0]["mse"] <= sensitivity["all_layers_mse"]


@pytest.mark.parametrize("fmt", ["w4a16", "nvfp4"])
def test_gptq_on_block_grids_keeps_each_blocks_scale_and_lowers_the_output_error(fmt):
    """w4a16 (INT4, blocks of 128) and nvfp4 (E2M1, blocks of 16 with E4M3 scales x global):
    GPTQ picks values on the grid under each column's block scale, and beats nearest rounding."""
    from ptqd.quant_math import E4M3, block_weight_scales, expand_blocks

    config = BitConfig.parse(fmt)
    grid, layout = config.weight_grid, config.weight_layout
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 256, generator=gen) @ torch.randn(256, 256, generator=gen)
    weight = torch.randn(48, 256, generator=gen)
    codes, global_scale = block_weight_scales(weight, grid, layout.block, E4M3 if layout.scale == "e4m3" else None)
    lq = LayerQuant(codes, None, weight_global=global_scale)
    scale = lq.weight_scale_matrix(weight)
    assert scale.shape == weight.shape and torch.equal(scale, expand_blocks(lq.dequant_scale(), layout.block))
    h = _hessian(layer_columns(nn.Linear(256, 48), x))
    nearest = quantize(weight, scale, grid)
    gptq = gptq_integers(weight, h, scale, grid)
    assert torch.equal(gptq, grid.round_(gptq.clone())) and grid.qmin <= gptq.min() and gptq.max() <= grid.qmax
    assert output_error(weight, gptq, scale, h) < 0.7 * output_error(weight, nearest, scale, h)
