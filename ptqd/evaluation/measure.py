"""What the report measures: every variant (FP32, each configuration with and without the
PTQD correction, the mixed schedule with and without) sampled on OUT's engines with the same
seeds, the latents of the first batch kept per step for the error-vs-step curve.

Sampling goes through `ptqd.sample.output_sampler`, the code `ptqd sample OUT` runs, so the
report's images are the images a user gets from the same command and seed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ptqd.runtime.formats import parse_config


@dataclass
class Variant:
    name: str            # fp32, w4a8, w4a8+ptqd, mixed, mixed+ptqd
    precision: str
    correction: bool
    images: np.ndarray | None = None
    latents: list[np.ndarray] = field(default_factory=list)  # first batch, after each step
    seconds: float = 0.0


def variants_for(configs: list[str]) -> list[Variant]:
    out = [Variant("fp32", "fp32", False)]
    for cfg in sorted(configs):
        out.append(Variant(cfg, cfg, False))
        if parse_config(cfg)[0].quantized:  # the float engine has no correction to apply (its statistics are zero)
            out.append(Variant(f"{cfg}+ptqd", cfg, True))
    return out + [Variant("mixed", "mixed", False), Variant("mixed+ptqd", "mixed", True)]


def sample_variant(out: Path, variant: Variant, num: int, seed: int, on_progress=None) -> Variant:
    from ptqd.sample import SampleRequest, output_sampler

    req = SampleRequest(out=out, model=None, num=num, seed=seed, steps=None, eta=None, batch_size=None,
                        backend="onnxruntime", npy=None, grid=None, force=False,
                        precision=variant.precision, correction=variant.correction, graph="fast")
    sampler = output_sampler(req)
    batch = sampler.batch_size
    chunks = []
    started = time.perf_counter()
    for start in range(0, num, batch):
        count = min(batch, num - start)
        keep = variant.latents if start == 0 else None

        def on_step(_index, x, keep=keep, count=count):
            if keep is not None:
                keep.append(x.copy())
            if on_progress:
                on_progress(count)

        chunks.append(sampler.chunk(seed, start, count, on_step=on_step))
    variant.seconds = time.perf_counter() - started
    variant.images = np.concatenate(chunks)
    return variant


def step_errors(variant: Variant, reference: Variant) -> list[float]:
    """Mean squared difference of the latent x_t to FP32's after each step (same noise)."""
    return [float(np.mean((a.astype(np.float64) - b) ** 2)) for a, b in zip(variant.latents, reference.latents)]
