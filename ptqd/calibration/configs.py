"""Bit configurations and which layers stay in float.

A configuration is named w{weight bits}a{activation bits} (integer grids), `fp8` (E4M3
weights per output channel and activations per tensor) or `fp16` (nothing quantized: the
float engine a schedule may fall back to, FP16 on TensorRT, FP32 in ONNX Runtime). `fp32`
is not a configuration but the full-precision reference (`ptqd sample --precision fp32`).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from ptqd.errors import UserError

SUPPORTED_WEIGHT_BITS = (4, 8)
SUPPORTED_ACT_BITS = (4, 8)
FLOAT_CONFIG = "fp32"
DEFAULT_CALIB_SAMPLES = 128
DEFAULT_CALIB_BATCH = 64   # samples per UNet call in calibration (--calib-batch)
# Mixed precision by default: spend up to 25 % more BOPs than the base configuration on
# the steps where its leftover noise is largest.
DEFAULT_POLICY = "budget:1.25"
# how the PTQD correction is applied (noise_stats.step_stats; "auto" picks one per step)
CORRECTIONS = ("paper", "raw-k", "bias-map")


FORMATS = ("int", "fp8", "fp16")
# the float candidate's bits, for the BOPs metric (FP16 weights times FP16 activations)
FP16_BITS = 16


@dataclass(frozen=True, order=True)
class BitConfig:
    weight_bits: int
    act_bits: int
    fmt: str = "int"    # "int": integer grids; "fp8": E4M3 grids; "fp16": nothing quantized

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise UserError(f"format {self.fmt!r} is not supported (supported: {', '.join(FORMATS)})")
        if self.fmt != "int":
            bits = 8 if self.fmt == "fp8" else FP16_BITS
            if (self.weight_bits, self.act_bits) != (bits, bits):
                raise ValueError(f"{self.fmt} has {bits}-bit weights and activations")
            return
        if self.weight_bits not in SUPPORTED_WEIGHT_BITS:
            raise UserError(f"weight bits {self.weight_bits} are not supported "
                            f"(supported: {', '.join(map(str, SUPPORTED_WEIGHT_BITS))})")
        if self.act_bits not in SUPPORTED_ACT_BITS:
            raise UserError(f"activation bits {self.act_bits} are not supported "
                            f"(supported: {', '.join(map(str, SUPPORTED_ACT_BITS))})")

    @classmethod
    def of_format(cls, fmt: str, weight_bits: int = 8, act_bits: int = 8) -> "BitConfig":
        """The configuration of a format: the integer one at the given bits, or fp8 / fp16."""
        if fmt == "fp8":
            return cls(8, 8, "fp8")
        if fmt == "fp16":
            return cls(FP16_BITS, FP16_BITS, "fp16")
        return cls(weight_bits, act_bits, fmt)

    @property
    def name(self) -> str:
        return self.fmt if self.fmt != "int" else f"w{self.weight_bits}a{self.act_bits}"

    @property
    def quantized(self) -> bool:
        return self.fmt != "fp16"

    # the grids (None for fp16) import torch (quant_math); this module stays importable
    # without it (the CLI)
    @property
    def weight_grid(self):
        return self._grid(self.weight_bits)

    @property
    def act_grid(self):
        return self._grid(self.act_bits)

    def _grid(self, bits: int):
        from ptqd.quant_math import E4M3, IntGrid

        return None if not self.quantized else E4M3 if self.fmt == "fp8" else IntGrid(bits)

    @classmethod
    def parse(cls, name: str) -> "BitConfig":
        text = name.strip().lower()
        if text in ("fp8", "fp16"):
            return cls.of_format(text)
        match = re.fullmatch(r"w(\d+)a(\d+)", text)
        if not match:
            raise UserError(f"{name!r} is not a configuration (expected e.g. w4a8, w8a8, fp8 or fp16)")
        return cls(int(match.group(1)), int(match.group(2)))


def candidate_configs(base: BitConfig, extra: list[str] | None = None) -> list[BitConfig]:
    """The base configuration plus the next-higher one a mixed schedule may switch to: w8a8
    above lower integer bits, the float engine (fp16) above fp8."""
    configs = {base}
    if base.fmt == "fp8":
        configs.add(BitConfig.of_format("fp16"))
    elif base != BitConfig(8, 8):
        configs.add(BitConfig(8, 8))
    for name in extra or []:
        configs.add(BitConfig.parse(name))
    return sorted(configs)


def is_kept(layer: str, keep: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(layer, pattern) for pattern in keep)
