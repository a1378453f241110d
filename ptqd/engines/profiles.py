"""Optimization profiles: which batch sizes (and the model's resolution) an engine serves."""
from __future__ import annotations

from dataclasses import dataclass

from ptqd.errors import UserError

INPUTS = ("sample", "timestep")


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


def input_shapes(sample_shape: list[int], profile: BatchProfile) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per input: (min, opt, max) shapes; only the batch axis varies."""
    shapes = {}
    for name in INPUTS:
        per = [(b, *sample_shape) if name == "sample" else (b,) for b in (profile.min, profile.opt, profile.max)]
        shapes[name] = tuple(per)
    return shapes
