"""The shared quantization math against ONNX QuantizeLinear as onnxruntime runs it."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from ptqd.quant_math import E4M3, IntGrid, activation_scale, fake_quantize, quantize, weight_scales


def _ort_quantize(x: np.ndarray, scale: np.ndarray, axis: int, bits) -> np.ndarray:
    qtype = {8: TensorProto.INT8, 4: TensorProto.INT4, "fp8": TensorProto.FLOAT8E4M3FN}[bits]
    zp = helper.make_tensor("zp", qtype, scale.shape, np.zeros(scale.size, dtype=np.int64).tolist())
    s = helper.make_tensor("s", TensorProto.FLOAT, scale.shape, scale.flatten().tolist())
    q = helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], axis=axis)
    dq = helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], axis=axis)
    graph = helper.make_graph([q, dq], "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)], [s, zp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _grid(bits):
    return E4M3 if bits == "fp8" else IntGrid(bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_equals_onnx_quantize_dequantize_per_tensor(bits):
    grid = _grid(bits)
    scale = np.array(0.05, dtype=np.float32)
    # exact .5 ties on the grid, both signs, and values far past saturation
    ties = (np.arange(-20, 20) + 0.5).astype(np.float32) * scale
    x = np.concatenate([ties, np.random.default_rng(0).normal(0, 3, 4000).astype(np.float32)])
    ours = fake_quantize(torch.from_numpy(x), torch.from_numpy(scale), grid).numpy()
    np.testing.assert_array_equal(ours, _ort_quantize(x, scale, 1, bits))


@pytest.mark.parametrize("bits", [4, 8, "fp8"])
def test_per_channel_weights_equal_onnx_on_axis_0(bits):
    grid = _grid(bits)
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    scale = weight_scales(w, grid)
    ours = fake_quantize(w, scale, grid, axis=0).numpy()
    np.testing.assert_array_equal(ours, _ort_quantize(w.numpy(), scale.numpy(), 0, bits))


def test_fp8_twin_equals_onnx_on_ties_subnormals_and_saturation():
    """E4M3 as QuantizeLinear(saturate=1) computes it: every representable value and every
    midpoint between neighbours (ties go to the even mantissa), subnormals, and values past
    +-448 (saturated, where a plain float8 cast would give NaN)."""
    import ml_dtypes

    values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid_values = np.unique(values[np.isfinite(values)])
    midpoints = (grid_values[:-1] + grid_values[1:]) / 2
    x = np.concatenate([grid_values, midpoints, [500.0, -1e4, 449.0, 1e-4, -3e-3],
                        np.random.default_rng(4).normal(0, 100, 4000)]).astype(np.float32)
    scale = np.array(1.0, dtype=np.float32)
    ours = fake_quantize(torch.from_numpy(x), torch.from_numpy(scale), E4M3).numpy()
    np.testing.assert_array_equal(ours, _ort_quantize(x, scale, 1, "fp8"))
    assert ours.max() == 448.0 and ours.min() == -448.0
    # ties to even: 1.0625 lies between 1.0 (mantissa 000) and 1.125 (001)
    assert quantize(torch.tensor([1.0625, 1.1875]), torch.tensor(1.0), E4M3).tolist() == [1.0, 1.25]


def test_rounding_is_half_to_even_and_saturates():
    grid = IntGrid(4)
    q = quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 100.0, -100.0]), torch.tensor(1.0), grid)
    assert q.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 7.0, -8.0]


def test_weight_clipping_search_beats_plain_min_max():
    grid = IntGrid(4)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    w[:, 0] *= 6  # one outlier per channel: min/max wastes the grid on it
    searched = weight_scales(w, grid)
    minmax = w.abs().amax(1) / grid.qmax
    err = lambda s: (fake_quantize(w, s, grid, axis=0) - w).pow(2).sum().item()
    assert err(searched) < 0.9 * err(minmax)
    assert (searched <= minmax + 1e-7).all()


def test_activation_scale_clips_heavy_tails():
    grid = IntGrid(4)
    v = torch.randn(100_000, generator=torch.Generator().manual_seed(3))
    scale = activation_scale(v, float(v.abs().max()), grid)
    assert scale * grid.qmax < v.abs().max() * 0.8


def test_e2m1_rounds_to_nearest_ties_to_even_and_saturates():
    from ptqd.quant_math import E2M1

    x = torch.tensor([0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, 1e9, -0.25, -2.6, -100.0])
    # ties go to the even mantissa: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    expected = [0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 0.0, -3.0, -6.0]
    assert E2M1.round_(x.clone()).tolist() == expected
    # every E2M1 value is its own rounding, and torch's own FP4 conversion agrees where it has one
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert torch.equal(E2M1.round_(grid.clone()), grid)
    import ml_dtypes

    values = torch.linspace(-7, 7, 2001)
    theirs = values.numpy().astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert np.array_equal(E2M1.round_(values.clone()).numpy(), theirs)


def test_nvfp4_block_scales_are_e4m3_values_under_one_global_scale():
    from ptqd.quant_math import E2M1, block_weight_scales

    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    weight[3, 5] = 40.0                        # one outlier sets the global scale
    codes, global_scale = block_weight_scales(weight, E2M1, 16, E4M3)
    assert codes.shape == (8, 4) and codes.max() <= E4M3.qmax
    assert torch.equal(codes, E4M3.round_(codes.clone())) and (codes > 0).all()
    # the outlier's block scale is the largest, at the top of E4M3's range
    assert codes.argmax() == 3 * 4 and codes.max() == E4M3.qmax
    # other blocks keep scales of their own size, far below the outlier's
    effective = codes * global_scale
    assert effective[0].max() < effective[3, 0] / 5
