"""What a quantization format is, said once: how a configuration of it is named and parsed,
its weight and activation grids and their granularity, the ONNX types its graphs store and
the first opset each type and scale layout needs (TYPE_OPSET, which the lint checks), the
kernel a quantized layer runs on TensorRT and the bytes the latency model charges for it,
the configuration a mixed schedule steps up to, and whether its CPU graph is its reference
graph. Calibration, the exporter, the lint, the latency model, the graph layout and the CLI
ask this registry instead of testing format strings; the precision plan's words for each
format sit beside the plan (exporter/precision_plan.STORAGE). Data only: no torch, no onnx
(the runtime imports it).

A configuration is named w{weight bits}a{activation bits} (integer grids), `fp8` (E4M3) or
`fp16` (nothing quantized: the float engine a schedule may fall back to).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ptqd.errors import UserError

# bytes a tensor element costs in memory traffic when a layer runs on a TensorRT kernel (a
# 4-bit grid held in INT8 costs a byte: what the GPU reads, not what the grid needs)
KERNEL_BYTES = {"fp16": 2, "fp8": 1, "int8": 1}
FLOAT_KERNEL = "fp16"
# the first opset whose QuantizeLinear/DequantizeLinear take an element type, a per-axis scale
# or a blocked one (TRT_API.md: per-channel >= 13, FP8 >= 19, INT4 and blocks >= 21)
TYPE_OPSET = {"INT8": 10, "FLOAT8E4M3FN": 19, "INT4": 21}
PER_AXIS_OPSET = 13
BLOCKED_OPSET = 21


@dataclass(frozen=True)
class Grid:
    """A tensor's quantization grid: `kind` int (symmetric, zero point 0, `bits`) or e4m3
    (FP8), at `granularity` channel (per output channel) or tensor (one static scale)."""
    kind: str
    granularity: str


@dataclass(frozen=True)
class QuantFormat:
    name: str                    # the --format word and BitConfig.fmt
    # the bits a configuration of this format may have: one for a float format (its name is
    # the configuration's), the choices of an integer one
    weight_bits: tuple[int, ...]
    act_bits: tuple[int, ...]
    weight_grid: Grid | None     # None: nothing quantized
    act_grid: Grid | None
    base: bool                   # may be calibrate's base configuration (--format)
    # the configuration a mixed schedule may switch to above one of this format (None: none)
    step_up: str | None = None
    # its configurations' reference graph serves ONNX Runtime's CPU-fast flavour too (no CPU
    # kernels to fuse into: FP8)
    cpu_fast_is_reference: bool = False

    @property
    def quantized(self) -> bool:
        return self.weight_grid is not None

    @property
    def fixed_bits(self) -> int | None:
        """The bits of a format with one configuration (fp8: 8, fp16: 16); None for a choice."""
        if len(self.weight_bits) == 1 and self.weight_bits == self.act_bits:
            return self.weight_bits[0]
        return None

    def config_name(self, weight_bits: int, act_bits: int) -> str:
        return self.name if self.fixed_bits is not None else f"w{weight_bits}a{act_bits}"

    def check_bits(self, weight_bits: int, act_bits: int) -> None:
        """UserError for bits this format has not (ValueError for a float format's: only code
        builds those)."""
        if self.fixed_bits is not None:
            if (weight_bits, act_bits) != (self.fixed_bits, self.fixed_bits):
                raise ValueError(f"{self.name} has {self.fixed_bits}-bit weights and activations")
            return
        for what, bits, allowed in (("weight", weight_bits, self.weight_bits), ("activation", act_bits, self.act_bits)):
            if bits not in allowed:
                raise UserError(f"{what} bits {bits} are not supported "
                                f"(supported: {', '.join(map(str, allowed))})")

    def onnx_types(self, weight_bits: int, act_bits: int, weight_int4: bool, act_int4: bool) -> tuple[str, str]:
        """(weight, activation) ONNX element type names of a configuration's Q/DQ in a graph
        flavour that stores 4-bit grids as INT4 (weight_int4 / act_int4) or in INT8."""
        if not self.quantized:
            raise ValueError(f"{self.name} stores nothing quantized")
        if self.weight_grid.kind == "e4m3":
            return "FLOAT8E4M3FN", "FLOAT8E4M3FN"
        return ("INT4" if weight_bits == 4 and weight_int4 else "INT8",
                "INT4" if act_bits == 4 and act_int4 else "INT8")

    def kernel(self, weight_bits: int, act_bits: int) -> str:
        """The TensorRT kernel a quantized layer of this configuration runs (KERNEL_BYTES).
        TensorRT runs a convolution in FP16, INT8 or FP8 only and INT4 only as weight-only
        blocked MatMul/Gemm: 4-bit weights run as INT8, and a W4A8 Linear keeps its 8-bit
        activations, so its GEMM is INT8 as well; w{b}a4 runs as INT8 too (no runtime has
        4-bit activation kernels)."""
        if not self.quantized:
            return FLOAT_KERNEL
        return "fp8" if self.weight_grid.kind == "e4m3" else "int8"


FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    # integer grids: symmetric weights per output channel, activations per tensor
    QuantFormat("int", weight_bits=(4, 8), act_bits=(4, 8),
                weight_grid=Grid("int", "channel"), act_grid=Grid("int", "tensor"), base=True,
                step_up="w8a8"),
    # E4M3 weights per output channel and activations per tensor
    QuantFormat("fp8", weight_bits=(8,), act_bits=(8,),
                weight_grid=Grid("e4m3", "channel"), act_grid=Grid("e4m3", "tensor"), base=True,
                step_up="fp16", cpu_fast_is_reference=True),
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
    if fmt is not None and fmt.fixed_bits is not None:
        return fmt, fmt.fixed_bits, fmt.fixed_bits
    match = re.fullmatch(r"w(\d+)a(\d+)", text)
    if not match:
        raise UserError(f"{name!r} is not a configuration (expected e.g. w4a8, w8a8, fp8 or fp16)")
    weight_bits, act_bits = int(match.group(1)), int(match.group(2))
    try:
        FORMATS["int"].check_bits(weight_bits, act_bits)
    except UserError as exc:
        raise UserError(f"configuration {name!r}: {exc}") from None
    return FORMATS["int"], weight_bits, act_bits


def config_kernel(name: str) -> str:
    """The TensorRT kernel a configuration's quantized layers run (QuantFormat.kernel)."""
    fmt, weight_bits, act_bits = parse_config(name)
    return fmt.kernel(weight_bits, act_bits)
