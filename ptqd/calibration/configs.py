"""Bit configurations and which layers stay in float.

What a configuration's format is (names, grids, ONNX types, kernels) is runtime.formats';
a BitConfig is one format at its bits. `fp32` is not a configuration but the full-precision
reference (`ptqd sample --precision fp32`).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from ptqd.runtime.formats import FORMATS, LAYER_KINDS, QuantFormat, parse_config, quant_format

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
        """The configuration of a format: an integer one at the given bits (w4a16 included:
        integer configurations are found by their bits), or fp8 / nvfp4 / fp16."""
        found = quant_format(fmt)
        if found.bits_named:
            return cls.parse(found.config_name(weight_bits, act_bits))
        return cls(found.weight_bits[0], found.act_bits[0], fmt)

    @property
    def name(self) -> str:
        return self.format.config_name(self.weight_bits, self.act_bits)

    @property
    def quantized(self) -> bool:
        return self.format.quantized

    def kernel(self, kind: str = "linear") -> str:
        """The TensorRT kernel its quantized layers of `kind` run (runtime.formats.QuantFormat.kernel)."""
        return self.format.kernel(kind)

    @property
    def kernels(self) -> tuple[str, ...]:
        """Every kernel its layers may run: what a target GPU must have."""
        return tuple(dict.fromkeys(self.kernel(kind) for kind in LAYER_KINDS))

    def quantizes(self, kind: str, width: int) -> bool:
        """Whether a layer of `kind` whose weight rows are `width` wide (input features; a
        convolution's in_channels x kh x kw) is quantized in this configuration: its kind takes
        a quantized format, and a blocked one fits whole blocks (else the layer stays float)."""
        own = self.for_kind(kind)
        layout = own.weight_layout
        return own.quantized and (not layout.blocked or width % layout.block == 0)

    def stays_float(self, layer, keep: tuple[str, ...]) -> bool:
        """Whether a priced layer (calibration.layers.LayerInfo) runs in float although its kind
        takes a quantized format here: kept by --keep, or no whole number of blocks wide. (A kind
        whose format is float, w4a16's convolutions, runs that format: not "kept".)"""
        return is_kept(layer.name, keep) or bool(self.for_kind(layer.kind).quantized and layer.out_elems
                                                 and not self.quantizes(layer.kind, layer.width))

    def for_kind(self, kind: str) -> "BitConfig":
        """The configuration a kind of layer ("conv", "linear") takes in this one: itself, or
        another format where this one says so (nvfp4's convolutions are fp8)."""
        fmt = self.format.format_for(kind)
        return self if fmt.name == self.fmt else BitConfig.of_format(fmt.name, self.weight_bits, self.act_bits)

    # the grids (None for fp16) import torch (quant_math); this module stays importable
    # without it (the CLI)
    @property
    def weight_grid(self):
        return _grid(self.format.weight_grid, self.weight_bits)

    @property
    def act_grid(self):
        return _grid(self.format.act_grid, self.act_bits)

    # how the grids are laid out (runtime.formats.Grid: granularity, block, block-scale format)
    @property
    def weight_layout(self):
        return self.format.weight_grid

    @property
    def act_layout(self):
        return self.format.act_grid

    @classmethod
    def parse(cls, name: str) -> "BitConfig":
        fmt, weight_bits, act_bits = parse_config(name)
        return cls(weight_bits, act_bits, fmt.name)


def _grid(grid, bits: int):
    """The quant_math grid a format's Grid stands for (its granularity is the Grid's)."""
    from ptqd.quant_math import E2M1, E4M3, IntGrid

    if grid is None:
        return None
    return {"e4m3": E4M3, "e2m1": E2M1}.get(grid.kind) or IntGrid(bits)


def candidate_configs(base: BitConfig, extra: list[str] | None = None) -> list[BitConfig]:
    """The base configuration plus the next-higher one a mixed schedule may switch to: w8a8
    above lower integer bits, fp8 above nvfp4, the float engine (fp16) above fp8 and w4a16."""
    configs = {base}
    if base.format.step_up is not None:
        configs.add(BitConfig.parse(base.format.step_up))
    for name in extra or []:
        configs.add(BitConfig.parse(name))
    return sorted(configs)


def is_kept(layer: str, keep: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(layer, pattern) for pattern in keep)
