"""Bit configurations and which layers stay in float.

What a configuration's format is (names, grids, ONNX types, kernels) is runtime.formats';
a BitConfig is one format at its bits. `fp32` is not a configuration but the full-precision
reference (`ptqd sample --precision fp32`).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from ptqd.runtime.formats import FORMATS, QuantFormat, parse_config, quant_format

FLOAT_CONFIG = "fp32"
DEFAULT_CALIB_SAMPLES = 128
DEFAULT_CALIB_BATCH = 64   # samples per UNet call in calibration (--calib-batch)
# Mixed precision by default: spend up to 25 % more BOPs than the base configuration on
# the steps where its leftover noise is largest.
DEFAULT_POLICY = "budget:1.25"
# how the PTQD correction is applied (noise_stats.step_stats; "auto" picks one per step)
CORRECTIONS = ("paper", "raw-k", "bias-map")


# the float candidate's bits, for the BOPs metric (FP16 weights times FP16 activations)
FP16_BITS = FORMATS["fp16"].fixed_bits


@dataclass(frozen=True, order=True)
class BitConfig:
    """A configuration: a format (runtime.formats) at its bits."""
    weight_bits: int
    act_bits: int
    fmt: str = "int"    # a runtime.formats.FORMATS name

    def __post_init__(self):
        self.format.check_bits(self.weight_bits, self.act_bits)

    @property
    def format(self) -> QuantFormat:
        return quant_format(self.fmt)

    @classmethod
    def of_format(cls, fmt: str, weight_bits: int = 8, act_bits: int = 8) -> "BitConfig":
        """The configuration of a format: the integer one at the given bits, or fp8 / fp16."""
        fixed = quant_format(fmt).fixed_bits
        return cls(fixed, fixed, fmt) if fixed is not None else cls(weight_bits, act_bits, fmt)

    @property
    def name(self) -> str:
        return self.format.config_name(self.weight_bits, self.act_bits)

    @property
    def quantized(self) -> bool:
        return self.format.quantized

    @property
    def kernel(self) -> str:
        """The TensorRT kernel its quantized layers run (runtime.formats.QuantFormat.kernel)."""
        return self.format.kernel(self.weight_bits, self.act_bits)

    # the grids (None for fp16) import torch (quant_math); this module stays importable
    # without it (the CLI)
    @property
    def weight_grid(self):
        return _grid(self.format.weight_grid, self.weight_bits)

    @property
    def act_grid(self):
        return _grid(self.format.act_grid, self.act_bits)

    @classmethod
    def parse(cls, name: str) -> "BitConfig":
        fmt, weight_bits, act_bits = parse_config(name)
        return cls(weight_bits, act_bits, fmt.name)


def _grid(grid, bits: int):
    """The quant_math grid a format's Grid stands for."""
    from ptqd.quant_math import E4M3, IntGrid

    if grid is None:
        return None
    return E4M3 if grid.kind == "e4m3" else IntGrid(bits)


def candidate_configs(base: BitConfig, extra: list[str] | None = None) -> list[BitConfig]:
    """The base configuration plus the next-higher one a mixed schedule may switch to: w8a8
    above lower integer bits, the float engine (fp16) above fp8."""
    configs = {base}
    if base.format.step_up is not None:
        configs.add(BitConfig.parse(base.format.step_up))
    for name in extra or []:
        configs.add(BitConfig.parse(name))
    return sorted(configs)


def is_kept(layer: str, keep: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(layer, pattern) for pattern in keep)
