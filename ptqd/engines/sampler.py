"""The one denoising loop: numpy only, any engine per step, the folded schedule applied.

An engine is any callable (sample [N,C,H,W] float32, timestep [N] float32) -> eps, so the
same loop drives onnxruntime sessions, TensorRT contexts, the torch fake-quant model, and
the Triton sampler model's BLS calls.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from ptqd.engines.noise import SampleNoise
from ptqd.exporter.schedule import FoldedSchedule, apply_step


class UNetEngine(Protocol):
    def __call__(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray: ...


class MinBatch:
    """An engine whose profile starts above 1, made to take any smaller batch: the batch is
    padded with copies of its last sample and the extra rows dropped (samples are independent,
    so the real rows are unchanged)."""

    def __init__(self, engine: UNetEngine, min_batch: int):
        self.engine, self.min_batch = engine, min_batch

    def __call__(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        n = len(sample)
        if n >= self.min_batch:
            return self.engine(sample, timestep)
        pad = self.min_batch - n
        sample = np.concatenate([sample, np.repeat(sample[-1:], pad, axis=0)])
        timestep = np.concatenate([timestep, np.repeat(timestep[-1:], pad, axis=0)])
        return self.engine(sample, timestep)[:n]


def denoise(schedule: FoldedSchedule, engines: Mapping[str, UNetEngine], noise: SampleNoise,
            on_step: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Run every step of the schedule on one batch; returns x_0 (unclipped, model scale).
    on_step(index, x) sees the latent after each step."""
    missing = sorted(set(schedule.configs) - set(engines))
    if missing:
        raise KeyError(f"no engine for configuration(s) {', '.join(missing)}")
    x = noise.initial()
    stochastic = schedule.eta > 0
    for step in schedule.steps:
        t = np.full((x.shape[0],), float(step.timestep), dtype=np.float32)
        eps = np.asarray(engines[step.config](x, t), dtype=np.float32)
        x = apply_step(schedule, step, x, eps, noise.step() if stochastic else None)
        if on_step:
            on_step(step.index, x)
    return x


def to_images(x: np.ndarray) -> np.ndarray:
    """Model scale [-1, 1] -> images in [0, 1], as diffusers' pipelines do."""
    return np.clip(x / 2.0 + 0.5, 0.0, 1.0).astype(np.float32)


def generate(schedule: FoldedSchedule, engines: Mapping[str, UNetEngine], num: int, seed: int,
             batch_size: int, first_index: int = 0,
             on_progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Images first_index .. first_index+num-1 of `seed`, in [0, 1], [num, C, H, W].

    Sample i depends only on (seed, i), so a request for images 8..15 returns the same images
    as the second half of a request for 0..15. on_progress(n) is told of n image-steps done.
    """
    shape = tuple(schedule.sample_shape)
    chunks = []
    for start in range(0, num, batch_size):
        count = min(batch_size, num - start)
        noise = SampleNoise(seed, first_index + start, count, shape)
        step_done = (lambda _i, _x, n=count: on_progress(n)) if on_progress else None
        chunks.append(to_images(denoise(schedule, engines, noise, on_step=step_done)))
    return np.concatenate(chunks)
