"""Optimization profiles: which batch sizes (and the model's resolution) an engine serves."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ptqd.errors import UserError
from ptqd.runtime.layout import ORT_MANIFEST


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
            raise UserError(f"--batch {text!r}: expected min,opt,max with 1 <= min <= opt <= max, e.g. 1,4,8")
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.min},{self.opt},{self.max}"

    def contains(self, batch: int) -> bool:
        return self.min <= batch <= self.max


def recorded_profile(engines_dir: Path) -> BatchProfile | None:
    """The batch range OUT/engines was built for (plan metadata, else onnxruntime.json), or
    None where no engines were built."""
    # <stem>.json beside each plan (not its <stem>.timing.json)
    metas = sorted(p.with_suffix(".json") for p in engines_dir.glob("*.plan"))
    metas.append(engines_dir / ORT_MANIFEST)
    for meta in metas:
        if meta.is_file():
            try:
                return BatchProfile.parse(json.loads(meta.read_text())["batch_profile"])
            except (ValueError, KeyError, TypeError, UserError):
                raise UserError(f"{meta} has no readable batch_profile; was it edited? "
                                "`ptqd verify` checks the output, `ptqd build --force` rebuilds") from None
    return None


def batched_shapes(dims: dict[str, list[int]], profile: BatchProfile) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per input: (min, opt, max) shapes; only the batch axis (first) varies."""
    return {name: tuple((b, *per) for b in (profile.min, profile.opt, profile.max))
            for name, per in dims.items()}


def input_shapes(sample_shape: list[int], profile: BatchProfile,
                 extra: list[dict] = ()) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The denoiser's inputs: sample, timestep, then a conditional model's conditioning inputs
    (PipelineSpec.denoiser_inputs: name and per-sample dims)."""
    dims = {"sample": list(sample_shape), "timestep": [], **{e["name"]: list(e["dims"]) for e in extra}}
    return batched_shapes(dims, profile)
