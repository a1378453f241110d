"""The quantization arithmetic, in one place: the torch fake-quant model and the ONNX QDQ
exporter both call these functions, so the two cannot disagree.

Semantics are ONNX QuantizeLinear/DequantizeLinear with zero point 0 (TensorRT accepts
nothing else): q = saturate(round_half_to_even(x / scale)), x' = q * scale. Scales are
float32 and strictly positive; weights are per output channel or per block of input columns,
activations per tensor or (NVFP4) per block of their last axis, scaled at run time.
Three kinds of grid: signed integers of 2..8 bits (IntGrid), FP8 E4M3 (FLOAT8E4M3FN, E4M3):
round to the nearest E4M3 value, ties to even, saturating at +-448 as QuantizeLinear does
with its default saturate=1, and FP4 E2M1 (E2M1): +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}, nearest,
ties to even, saturating at +-6.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LP_NORM = 2.4  # clipping search error norm, as in Q-Diffusion/BRECQ's weight calibration
MIN_SCALE = 1e-8


@dataclass(frozen=True)
class IntGrid:
    """A signed integer grid of `bits` bits: [-2^(b-1), 2^(b-1) - 1]."""
    bits: int

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 5, 6, 7, 8):
            raise ValueError(f"unsupported bit width {self.bits}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def storage(self) -> torch.dtype:
        return torch.int8

    def round_(self, v: torch.Tensor) -> torch.Tensor:
        """Rounds `v` in place. torch.round rounds half to even, like QuantizeLinear."""
        return v.round_().clamp_(self.qmin, self.qmax)


@dataclass(frozen=True)
class FP8Grid:
    """FP8 E4M3 without infinities (ONNX FLOAT8E4M3FN, TensorRT kFP8): 4 exponent bits (bias
    7), 3 mantissa bits, largest finite value 448, subnormals down to 2^-9."""
    bits: int = 8
    qmin: float = -448.0
    qmax: float = 448.0

    @property
    def storage(self) -> torch.dtype:
        return torch.float8_e4m3fn

    def round_(self, v: torch.Tensor) -> torch.Tensor:
        """Rounds `v` (float32) in place. torch's float8_e4m3fn cast rounds to nearest even but
        turns out-of-range values into NaN, so saturate first (QuantizeLinear's saturate=1)."""
        return v.copy_(v.clamp_(self.qmin, self.qmax).to(torch.float8_e4m3fn))


@dataclass(frozen=True)
class FP4Grid:
    """FP4 E2M1 (ONNX FLOAT4E2M1, NVFP4's values): 2 exponent bits, 1 mantissa bit, largest
    value 6. Between powers of two the grid is evenly spaced (0.5 below 2, 1 up to 4, 2 up to
    6), so rounding is round-half-to-even of |v| / spacing, which lands ties on the even
    mantissa as the format's rounding does. Written with the ops an ONNX graph has (Abs,
    Clip, Less, Where, Div, Round, Mul, Sign), so ONNX Runtime's stand-in (exporter/qdq.py)
    computes the same values."""
    bits: int = 4
    qmin: float = -6.0
    qmax: float = 6.0

    @property
    def storage(self) -> torch.dtype:
        # torch has no unpacked FP4 type; E4M3 holds every E2M1 value exactly
        return torch.float8_e4m3fn

    def round_(self, v: torch.Tensor) -> torch.Tensor:
        a = v.abs().clamp_(max=self.qmax)
        step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
        return v.copy_(torch.sign(v).mul_(a.div_(step).round_().mul_(step)))


E4M3 = FP8Grid()
E2M1 = FP4Grid()
# the smallest positive E4M3 value (a subnormal): a block scale that rounds below it would
# divide by zero
E4M3_TINY = 2.0 ** -9
# FP16's smallest normal value. NVFP4's global scales are single numbers that TensorRT's FP16
# graph holds in FP16 (the DQ of the block scales emits FP16): kept at or above this and made
# FP16-exact (fp16_global), the FP16 pass changes no weight and no block scale. (A global scale
# below it would be an FP16 subnormal, a few bits or none: every weight of the layer off alike.)
FP16_MIN_NORMAL = 2.0 ** -14


def fp16_global(scale: torch.Tensor) -> torch.Tensor:
    """A global scale as an FP16-exact float32 in FP16's normal range (FP16_MIN_NORMAL)."""
    return scale.to(torch.float32).clamp(min=FP16_MIN_NORMAL).half().float()
Grid = IntGrid | FP8Grid | FP4Grid


def _broadcast(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """`scale` (float32, on x's device) shaped to broadcast along `axis` of x."""
    scale = scale.to(x.device, torch.float32)
    if scale.shape == x.shape:   # an elementwise scale (blocks expanded: expand_blocks)
        return scale
    if axis is None or scale.numel() == 1:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, grid: Grid, axis: int | None = None) -> torch.Tensor:
    """Grid values (integers, or E4M3 values; a float32 tensor) exactly as QuantizeLinear
    computes them."""
    s = _broadcast(scale, x, axis)
    # divide (not multiply by 1/s): the operation the ONNX spec and onnxruntime perform. The
    # quotient is a fresh tensor, so it is rounded in place: on the calibration's activations
    # the temporaries cost 5x the arithmetic (measured on the built-in UNet's layer inputs)
    return grid.round_(x.to(torch.float32) / s)


def dequantize(q: torch.Tensor, scale: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    return q * _broadcast(scale, q, axis)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, grid: Grid, axis: int | None = None) -> torch.Tensor:
    return quantize(x, scale, grid, axis).mul_(_broadcast(scale, x, axis))


def scale_for_range(max_abs: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The symmetric scale that maps [-max_abs, max_abs] onto the grid."""
    return torch.clamp(max_abs.to(torch.float32) / grid.qmax, min=MIN_SCALE)


# elements of a weight searched at a time: a block of output channels whose temporaries stay
# in the CPU's cache. Searching a Stable Diffusion 1.5 conv (1280x1280x3x3) whole took 15.6 s
# per grid on this project's 2-core machine, mostly page faults on fresh 59 MB temporaries.
SEARCH_BLOCK = 1 << 16


def weight_scales(weight: torch.Tensor, grid: Grid, candidates: int = 60) -> torch.Tensor:
    """Per-output-channel scales: the clipping ratio that minimises the Lp reconstruction
    error of each channel, searched over [0.2, 1] of the channel's absolute maximum. Channels
    are independent, so they are searched a block at a time (the result does not depend on it)."""
    w = weight.detach().to(torch.float32).reshape(weight.shape[0], -1)
    max_abs = w.abs().amax(dim=1)
    best_err = torch.full_like(max_abs, float("inf"))
    best = scale_for_range(max_abs, grid)
    ratios = torch.linspace(0.2, 1.0, candidates)
    # two rows at least: a reduction with one output may be split across threads (another sum order)
    rows = max(2, SEARCH_BLOCK // w.shape[1])
    for start in range(0, w.shape[0], rows):
        block, peak = w[start:start + rows], max_abs[start:start + rows]
        block_err, block_best = best_err[start:start + rows], best[start:start + rows]  # views
        for ratio in ratios:
            scale = scale_for_range(peak * ratio, grid)
            err = fake_quantize(block, scale, grid, axis=0).sub_(block).abs_().pow_(LP_NORM).sum(dim=1)
            better = err < block_err
            block_err.copy_(torch.where(better, err, block_err))
            block_best.copy_(torch.where(better, scale, block_best))
    return best


def activation_scale(values: torch.Tensor, max_abs: float, grid: Grid, candidates: int = 100) -> torch.Tensor:
    """Per-tensor scale minimising the MSE of fake-quantizing `values` (a sample of the
    activation), searched over clipping points up to the observed absolute maximum."""
    v = values.detach().to(torch.float32).flatten()
    best_err, best = float("inf"), scale_for_range(torch.tensor(max_abs), grid)
    for ratio in torch.linspace(0.05, 1.0, candidates):
        scale = scale_for_range(torch.tensor(max_abs) * ratio, grid)
        err = (fake_quantize(v, scale, grid) - v).pow(2).mean().item()
        if err < best_err:
            best_err, best = err, scale
    return best


def expand_blocks(scale: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block scales [out, in / block] as the weight's [out, in] elementwise scale."""
    return scale.repeat_interleave(block, dim=1)


def block_weight_scales(weight: torch.Tensor, grid: Grid, block: int,
                        scale_grid: Grid | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales of a Linear weight [out, in] per block of `block` input columns: each block's
    clipping searched as weight_scales searches a channel's. With `scale_grid` (E4M3: NVFP4)
    the block scales are stored on that grid under one FP32 global scale, which maps the
    largest onto the grid's top: (grid values [out, in / block], global); the scale a block
    uses is their product. Without: (FP32 scales, None)."""
    out, cols = weight.shape
    if cols % block:
        raise ValueError(f"{cols} input columns are not a whole number of blocks of {block}")
    scales = weight_scales(weight.detach().reshape(out * cols // block, block), grid).reshape(out, cols // block)
    if scale_grid is None:
        return scales, None
    global_scale = fp16_global(scale_for_range(scales.max(), scale_grid))
    codes = quantize(scales, global_scale, scale_grid).clamp_(min=E4M3_TINY)
    return codes, global_scale


def fake_quantize_dynamic(x: torch.Tensor, global_scale: torch.Tensor, grid: Grid, block: int,
                          scale_grid: Grid = E4M3) -> torch.Tensor:
    """An activation quantized as TensorRT's dynamic block quantize does (NVFP4): blocks of
    `block` along the last axis, each scaled by its own absolute maximum mapped onto the
    grid's top, that scale rounded onto `scale_grid` under the calibrated `global_scale`. A
    block whose scale rounds to 0 (all zeros, or tiny beside the calibrated range) comes out 0:
    divided by 1 to stay finite, multiplied back by its scale."""
    shape = x.shape
    xb = x.to(torch.float32).reshape(-1, block)
    amax = xb.abs().amax(dim=1, keepdim=True)
    scale = dequantize(quantize(amax / grid.qmax, global_scale, scale_grid), global_scale)
    safe = torch.where(scale == 0, 1.0, scale)
    return grid.round_(xb / safe).mul_(scale).reshape(shape)
