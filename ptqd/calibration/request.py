"""What a calibration is asked to do (the options of `ptqd calibrate` / `export-trt`), checked
before anything heavy is imported or loaded: a mistyped option is refused in a fraction of a
second, not after torch and the model have loaded. No torch here."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ptqd.calibration.configs import (CORRECTIONS, DEFAULT_CALIB_BATCH, DEFAULT_CALIB_SAMPLES, DEFAULT_POLICY,
                                      BitConfig, candidate_configs)
from ptqd.calibration.gpus import DEFAULT_GPU, format_peak, gpu_spec
from ptqd.calibration.mixed_precision import Policy
from ptqd.errors import UserError
from ptqd.runtime.formats import BASE_FORMATS, KERNELS

WEIGHT_ROUNDINGS = ("nearest", "gptq")


@dataclass(frozen=True)
class CalibrationRequest:
    model: str
    bits: int = 4
    act_bits: int = 8
    steps: int = 50
    eta: float = 0.0
    seed: int = 0
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    mixed_precision: str = DEFAULT_POLICY
    correction: str = "auto"
    extra_configs: tuple[str, ...] = ()
    keep: tuple[str, ...] | None = None   # layers kept in float; None: the model family's default
    # conditional models: None = the kind's default (conditions.DEFAULT_GUIDANCE)
    guidance_scale: float | None = None
    conditions: tuple = ()      # calibration prompts (str) or class labels (int); () = defaults
    weight_rounding: str | None = None   # None: gptq below 8 weight bits, else nearest
    target_gpu: str = DEFAULT_GPU        # whose datasheet peaks price the latency estimates
    format: str = "int"                  # the base configuration's (runtime.formats.BASE_FORMATS)
    sensitivity: bool = True             # measure the per-layer sensitivity map
    calib_batch: int = DEFAULT_CALIB_BATCH  # samples per UNet call (trajectories, statistics, probes)

    @property
    def base(self) -> BitConfig:
        return BitConfig.of_format(self.format, self.bits, self.act_bits)

    @property
    def rounding(self) -> str:
        if self.weight_rounding is not None:
            return self.weight_rounding
        return "gptq" if self.base.weight_bits < 8 else "nearest"

    def for_model(self, family) -> "CalibrationRequest":
        """The request with the model family's defaults filled in (--keep), as it is recorded
        and digested: a default and its explicit value are one calibration."""
        return self if self.keep is not None else replace(self, keep=tuple(family.default_keep))

    def validate(self) -> tuple[BitConfig, Policy]:
        if self.format not in BASE_FORMATS:
            raise UserError(f"--format {self.format!r}: expected {' or '.join(BASE_FORMATS)}")
        base = self.base
        policy = Policy.parse(self.mixed_precision)
        if self.calib_samples < 8:
            raise UserError(f"--calib-samples {self.calib_samples} is too few (at least 8)")
        if self.calib_batch < 1:
            raise UserError(f"--calib-batch {self.calib_batch}: at least 1 sample per denoiser call")
        if self.correction not in ("auto", *CORRECTIONS):
            raise UserError(f"--correction {self.correction!r}: expected auto or {', '.join(CORRECTIONS)}")
        if self.weight_rounding not in (None, *WEIGHT_ROUNDINGS):
            raise UserError(f"--weight-rounding {self.weight_rounding!r}: expected {' or '.join(WEIGHT_ROUNDINGS)}")
        # every configuration parsed and priceable on the target before minutes of calibration
        configs = candidate_configs(base, list(self.extra_configs))
        gpu = gpu_spec(self.target_gpu)
        for kernel in dict.fromkeys(k for c in configs for k in c.kernels):
            format_peak(gpu, KERNELS[kernel].rate)
        return base, policy
