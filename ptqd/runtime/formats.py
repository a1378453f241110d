"""What a quantization format is, said once: how a configuration of it is named and parsed,
its weight and activation grids and their granularity, the format each kind of layer takes in
one of its configurations, the ONNX types its graphs store and the first opset each type and
scale layout needs (TYPE_OPSET, which the lint checks), the kernel a quantized layer runs on
TensorRT and what the latency model charges for it, the configuration a mixed schedule steps
up to, and whether its CPU graph is its reference graph. Calibration, the exporter, the lint,
the latency model, the graph layout and the CLI ask this registry instead of testing format
strings; the precision plan's words for each format sit beside the plan
(exporter/precision_plan.STORAGE). Data only: no torch, no onnx (the runtime imports it).

Configurations are named w{weight bits}a{activation bits} (integer grids: w4a8, w8a8, and
w4a16, INT4 weight-only), or by their format's name: `fp8` (E4M3), `nvfp4` (FP4 E2M1 in blocks
of 16) and `fp16` (nothing quantized: the float engine a schedule may fall back to).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ptqd.errors import UserError

LAYER_KINDS = ("conv", "linear")


@dataclass(frozen=True)
class Kernel:
    """What a Conv2d/Linear costs on one TensorRT kernel: the tensor-core peak it runs at
    (calibration.gpus.format_peak) and the bytes it reads per weight and per input element,
    block scales included. A 4-bit grid held in INT8 costs a byte: what the GPU reads, not what
    the grid needs."""
    rate: str
    weight_bytes: float
    act_bytes: float
    # the GPUs whose TensorRT builds it: compute capability at least this (0: any TensorRT's)
    min_compute_capability: float = 0.0


KERNELS = {
    "fp16": Kernel("fp16", 2, 2),
    "int8": Kernel("int8", 1, 1),
    # FP8: Ada and Hopper on (TensorRT's quantized-types docs)
    "fp8": Kernel("fp8", 1, 1, min_compute_capability=8.9),
    # INT4 weight-only GEMM: two weights a byte plus an FP16 scale per block of 128, FP16
    # activations and FP16 tensor cores (the weights are dequantized on the way in)
    "int4-weight-only": Kernel("fp16", 0.5 + 2 / 128, 2),
    # NVFP4 GEMM: weights and activations two a byte plus an E4M3 scale per block of 16, on
    # Blackwell's FP4 tensor cores
    "nvfp4": Kernel("fp4", 0.5 + 1 / 16, 0.5 + 1 / 16, min_compute_capability=10.0),
}
FLOAT_KERNEL = "fp16"
# the first opset whose QuantizeLinear/DequantizeLinear take an element type, a per-axis scale
# or a blocked one (TRT_API.md: per-channel >= 13, FP8 >= 19, INT4 and blocks >= 21, FP4 >= 23)
TYPE_OPSET = {"INT8": 10, "FLOAT8E4M3FN": 19, "INT4": 21, "FLOAT4E2M1": 23}
PER_AXIS_OPSET = 13
BLOCKED_OPSET = 21


@dataclass(frozen=True)
class Grid:
    """A tensor's quantization grid: `kind` int (symmetric, zero point 0, the configuration's
    bits), e4m3 (FP8) or e2m1 (FP4), at `granularity` channel (per output channel), tensor (one
    static scale), block (`block` weights along the reduction axis share a scale) or
    dynamic-block (an activation's blocks of `block` along its last axis, scaled at run time
    from their own maximum). `scale` is how block scales are stored: fp32, or e4m3 under one
    FP32 global scale (NVFP4's two levels)."""
    kind: str
    granularity: str
    block: int = 0
    scale: str = "fp32"

    @property
    def blocked(self) -> bool:
        return self.block > 0


@dataclass(frozen=True)
class QuantFormat:
    name: str                    # the --format word and BitConfig.fmt
    # the bits a configuration of this format may have: one for a float format (its name is
    # the configuration's), the choices of an integer one
    weight_bits: tuple[int, ...]
    act_bits: tuple[int, ...]
    weight_grid: Grid | None     # None: nothing quantized
    act_grid: Grid | None        # None: activations stay float (weight-only)
    base: bool                   # may be calibrate's base configuration (--format)
    kernel_name: str = FLOAT_KERNEL   # its quantized layers' TensorRT kernel (KERNELS)
    # the configuration a mixed schedule may switch to above one of this format (None: none)
    step_up: str | None = None
    # its configurations' reference graph serves ONNX Runtime's CPU-fast flavour too (no CPU
    # kernels to fuse into: FP8, FP4)
    cpu_fast_is_reference: bool = False
    # configurations named w{bits}a{bits} (integer grids), else by the format's name
    bits_named: bool = False
    # (layer kind, format) where a kind of layer takes another format in this format's
    # configurations (TensorRT has no 4-bit convolution); other kinds take this one
    by_kind: tuple[tuple[str, str], ...] = ()
    why_by_kind: str = ""

    @property
    def quantized(self) -> bool:
        return self.weight_grid is not None

    @property
    def fixed_bits(self) -> int | None:
        """The bits of a format with one configuration (fp8: 8, nvfp4: 4, fp16: 16); None for
        a choice or for weights and activations of different widths."""
        if len(self.weight_bits) == 1 and self.weight_bits == self.act_bits:
            return self.weight_bits[0]
        return None

    def format_for(self, kind: str) -> "QuantFormat":
        """The format a kind of layer ("conv", "linear") takes in this format's configurations."""
        if kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {kind!r}")
        return FORMATS[dict(self.by_kind).get(kind, self.name)]

    def config_name(self, weight_bits: int, act_bits: int) -> str:
        return f"w{weight_bits}a{act_bits}" if self.bits_named else self.name

    def check_bits(self, weight_bits: int, act_bits: int) -> None:
        """UserError for bits this format has not (ValueError for a float format's: only code
        builds those)."""
        if not self.bits_named:
            if (weight_bits, act_bits) != (self.weight_bits[0], self.act_bits[0]):
                raise ValueError(f"{self.name} has {self.weight_bits[0]}-bit weights and "
                                 f"{self.act_bits[0]}-bit activations")
            return
        for what, bits, allowed in (("weight", weight_bits, self.weight_bits), ("activation", act_bits, self.act_bits)):
            if bits not in allowed:
                raise UserError(f"{what} bits {bits} are not supported "
                                f"(supported: {', '.join(map(str, allowed))})")

    def onnx_types(self, weight_bits: int, act_bits: int, weight_int4: bool, act_int4: bool,
                   fp4: bool = True) -> tuple[str, str | None]:
        """(weight, activation) ONNX element type names of a configuration's Q/DQ in a graph
        flavour that stores 4-bit integer grids of quantized-activation layers as INT4
        (weight_int4 / act_int4) or in INT8, and FP4 values as FLOAT4E2M1 (fp4) or in E4M3,
        which holds every E2M1 value exactly (ONNX Runtime has no FLOAT4E2M1 kernel). A
        weight-only format's activation type is None; its INT4 weights are INT4 in every
        flavour (TensorRT's INT4 is exactly that)."""
        if not self.quantized:
            raise ValueError(f"{self.name} stores nothing quantized")
        if self.weight_grid.kind == "e2m1":
            return ("FLOAT4E2M1" if fp4 else "FLOAT8E4M3FN"), ("FLOAT4E2M1" if fp4 else "FLOAT8E4M3FN")
        if self.weight_grid.kind == "e4m3":
            return "FLOAT8E4M3FN", "FLOAT8E4M3FN"
        if self.act_grid is None:
            return "INT4" if weight_bits == 4 else "INT8", None
        return ("INT4" if weight_bits == 4 and weight_int4 else "INT8",
                "INT4" if act_bits == 4 and act_int4 else "INT8")

    def kernel(self, kind: str = "linear") -> str:
        """The TensorRT kernel (KERNELS) a quantized layer of `kind` runs in a configuration of
        this format. TensorRT runs a convolution in FP16, INT8 or FP8 only and INT4 only as
        weight-only blocked MatMul/Gemm: w4a8's 4-bit weights run as INT8 (its 8-bit
        activations need an INT8 GEMM), and w{b}a4 runs as INT8 too (no runtime has 4-bit
        integer activation kernels)."""
        return self.format_for(kind).kernel_name


FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    # integer grids: symmetric weights per output channel, activations per tensor
    QuantFormat("int", weight_bits=(4, 8), act_bits=(4, 8),
                weight_grid=Grid("int", "channel"), act_grid=Grid("int", "tensor"), base=True,
                kernel_name="int8", step_up="w8a8", bits_named=True),
    # INT4 weight-only Linear layers (TensorRT's INT4: symmetric, blocks of 128 along the input
    # dimension, FP16 activations); convolutions FP16
    QuantFormat("w4a16", weight_bits=(4,), act_bits=(16,),
                weight_grid=Grid("int", "block", block=128), act_grid=None, base=False,
                kernel_name="int4-weight-only", step_up="fp16", bits_named=True,
                by_kind=(("conv", "fp16"),),
                why_by_kind="TensorRT's INT4 is weight-only MatMul/Gemm: convolutions run FP16"),
    # E4M3 weights per output channel and activations per tensor
    QuantFormat("fp8", weight_bits=(8,), act_bits=(8,),
                weight_grid=Grid("e4m3", "channel"), act_grid=Grid("e4m3", "tensor"), base=True,
                kernel_name="fp8", step_up="fp16", cpu_fast_is_reference=True),
    # NVFP4 Linear layers: E2M1 weights in blocks of 16 along the input dimension with E4M3
    # block scales under an FP32 global scale; activations the same, their block scales found
    # at run time (the global scale calibrated); convolutions FP8
    QuantFormat("nvfp4", weight_bits=(4,), act_bits=(4,),
                weight_grid=Grid("e2m1", "block", block=16, scale="e4m3"),
                act_grid=Grid("e2m1", "dynamic-block", block=16, scale="e4m3"), base=True,
                kernel_name="nvfp4", step_up="fp8", cpu_fast_is_reference=True,
                by_kind=(("conv", "fp8"),),
                why_by_kind="TensorRT has no FP4 convolution (FP4 is for MatMul/Gemm only): convolutions run FP8"),
    # nothing quantized: the float engine (FP16 on TensorRT, FP32 in ONNX Runtime)
    QuantFormat("fp16", weight_bits=(16,), act_bits=(16,),
                weight_grid=None, act_grid=None, base=False),
)}
BASE_FORMATS = tuple(name for name, f in FORMATS.items() if f.base)


def quant_format(name: str) -> QuantFormat:
    fmt = FORMATS.get(name)
    if fmt is None:
        raise UserError(f"format {name!r} is not supported (supported: {', '.join(FORMATS)})")
    return fmt


def parse_config(name: str) -> tuple[QuantFormat, int, int]:
    """A configuration's name -> (format, weight bits, activation bits); the bits checked."""
    text = name.strip().lower()
    fmt = FORMATS.get(text)
    if fmt is not None and not fmt.bits_named:
        return fmt, fmt.weight_bits[0], fmt.act_bits[0]
    match = re.fullmatch(r"w(\d+)a(\d+)", text)
    if not match:
        raise UserError(f"{name!r} is not a configuration (expected e.g. w4a8, w8a8, w4a16, fp8, nvfp4 or fp16)")
    weight_bits, act_bits = int(match.group(1)), int(match.group(2))
    for fmt in FORMATS.values():
        if fmt.bits_named and weight_bits in fmt.weight_bits and act_bits in fmt.act_bits:
            return fmt, weight_bits, act_bits
    try:
        FORMATS["int"].check_bits(weight_bits, act_bits)
    except UserError as exc:
        raise UserError(f"configuration {name!r}: {exc}") from None
    raise AssertionError("unreachable: the integer format accepts what check_bits passed")


def min_compute_capability(config: str) -> float:
    """The oldest GPU (compute capability) whose TensorRT builds a configuration's engine; 0
    for a name that is no configuration (fp32 graphs: the VAE decoder, text encoders)."""
    try:
        fmt = parse_config(config)[0]
    except UserError:
        return 0.0
    return max(KERNELS[fmt.kernel(kind)].min_compute_capability for kind in LAYER_KINDS)


def config_kernel(name: str, kind: str = "linear") -> str:
    """The TensorRT kernel a configuration's quantized layers of `kind` run (QuantFormat.kernel)."""
    return parse_config(name)[0].kernel(kind)
