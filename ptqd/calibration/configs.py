"""Bit configurations and which layers stay in float.

A configuration is named w{weight bits}a{activation bits}; `fp32` is the float engine.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from ptqd.errors import UserError

SUPPORTED_WEIGHT_BITS = (4, 8)
SUPPORTED_ACT_BITS = (4, 8)
FLOAT_CONFIG = "fp32"
# PTQD, Q-Diffusion and NVIDIA's recipes keep these in float: the first and last conv see
# the raw image and produce eps directly, and the time embedding feeds every block.
DEFAULT_KEEP = ("conv_in", "conv_out", "time_embedding.*")
DEFAULT_CALIB_SAMPLES = 128
# Mixed precision by default: spend up to 25 % more BOPs than the base configuration on
# the steps where its leftover noise is largest.
DEFAULT_POLICY = "budget:1.25"


@dataclass(frozen=True, order=True)
class BitConfig:
    weight_bits: int
    act_bits: int

    def __post_init__(self):
        if self.weight_bits not in SUPPORTED_WEIGHT_BITS:
            raise UserError(f"weight bits {self.weight_bits} are not supported "
                            f"(supported: {', '.join(map(str, SUPPORTED_WEIGHT_BITS))})")
        if self.act_bits not in SUPPORTED_ACT_BITS:
            raise UserError(f"activation bits {self.act_bits} are not supported "
                            f"(supported: {', '.join(map(str, SUPPORTED_ACT_BITS))})")

    @property
    def name(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"

    @classmethod
    def parse(cls, name: str) -> "BitConfig":
        match = re.fullmatch(r"w(\d+)a(\d+)", name.strip().lower())
        if not match:
            raise UserError(f"{name!r} is not a bit configuration (expected e.g. w4a8)")
        return cls(int(match.group(1)), int(match.group(2)))


def candidate_configs(base: BitConfig, extra: list[str] | None = None) -> list[BitConfig]:
    """The base configuration plus the next-higher one a mixed schedule may switch to."""
    configs = {base}
    if base != BitConfig(8, 8):
        configs.add(BitConfig(8, 8))
    for name in extra or []:
        configs.add(BitConfig.parse(name))
    return sorted(configs)


def is_kept(layer: str, keep: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(layer, pattern) for pattern in keep)
