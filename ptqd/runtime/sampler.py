"""The one denoising loop: numpy only, any engine per step, the folded schedule applied.

An engine is any callable (sample [N,C,H,W] float32, timestep [N] float32) -> eps, so the
same loop drives onnxruntime sessions, TensorRT contexts, the torch fake-quant model, and
the Triton sampler model's BLS calls. Conditional models' engines also take their
conditioning inputs as keyword arrays; `conditioning.Guided` binds those per chunk, which
turns them back into (sample, timestep) engines for the loop.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ptqd.runtime.conditioning import Conditioner, decode_images
from ptqd.runtime.noise import SampleNoise
from ptqd.runtime.schedule import FoldedSchedule, apply_step


class UNetEngine(Protocol):
    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditioning: np.ndarray) -> np.ndarray: ...


class MinBatch:
    """An engine whose profile starts above 1, made to take any smaller batch: the batch is
    padded with copies of its last sample and the extra rows dropped (samples are independent,
    so the real rows are unchanged)."""

    def __init__(self, engine, min_batch: int):
        self.engine, self.min_batch = engine, min_batch

    def _padded(self, fn, arrays: tuple, named: dict):
        n = len(arrays[0] if arrays else next(iter(named.values())))
        if n >= self.min_batch:
            return fn(*arrays, **named)
        pad = lambda v: np.concatenate([v, np.repeat(v[-1:], self.min_batch - n, axis=0)])
        out = fn(*map(pad, arrays), **{k: pad(v) for k, v in named.items()})
        return {k: v[:n] for k, v in out.items()} if isinstance(out, dict) else out[:n]

    def __call__(self, *arrays: np.ndarray, **named: np.ndarray) -> np.ndarray:
        """Any engine's inputs (a denoiser's sample, timestep and conditioning; a decoder's latents)."""
        return self._padded(self.engine, arrays, named)

    def run(self, **named: np.ndarray) -> np.ndarray:
        """A graph's keyword inputs -> its first output."""
        return self._padded(self.engine.run, (), named)

    def outputs(self, **named: np.ndarray) -> dict[str, np.ndarray]:
        """A graph's keyword inputs -> every output by name (a text encoder's)."""
        return self._padded(self.engine.outputs, (), named)


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


def sample_chunk(schedule: FoldedSchedule, engines: Mapping[str, UNetEngine], seed: int, first_index: int,
                 start: int, count: int, on_step: Callable[[int, np.ndarray], None] | None = None,
                 conditioner: Conditioner | None = None, decoder=None) -> np.ndarray:
    """Images start .. start+count-1 of a request whose first image is sample first_index of
    `seed`: conditioned (and guided) as the conditioner says, decoded by the VAE decoder if any.
    Image i of the seed gets noise (seed, i) and conditions[i % n], whatever the request."""
    noise = SampleNoise(seed, first_index + start, count, tuple(schedule.sample_shape))
    if conditioner is not None:
        engines = conditioner.engines_for(engines, first_index + start, count)
    return decode_images(denoise(schedule, engines, noise, on_step=on_step), decoder)


def generate(schedule: FoldedSchedule, engines: Mapping[str, UNetEngine], num: int, seed: int,
             batch_size: int, first_index: int = 0,
             on_progress: Callable[[int], None] | None = None,
             conditioner: Conditioner | None = None, decoder=None) -> np.ndarray:
    """Images first_index .. first_index+num-1 of `seed`, in [0, 1], [num, C, H, W].

    Sample i depends only on (seed, i) and the conditions (it gets conditions[i % count]), so a
    request for images 8..15 returns the same images as the second half of a request for
    0..15 with the same conditions. on_progress(n) is told of n image-steps done.
    """
    chunks = []
    for start in range(0, num, batch_size):
        count = min(batch_size, num - start)
        step_done = (lambda _i, _x, n=count: on_progress(n)) if on_progress else None
        chunks.append(sample_chunk(schedule, engines, seed, first_index, start, count, step_done,
                                   conditioner, decoder))
    return np.concatenate(chunks)


@dataclass
class Sampler:
    """Everything that turns (seed, indices) into images: the schedule, an engine per
    configuration, images per chunk, and for conditional / latent models the conditioner
    and the VAE decoder. `ptqd sample`, the report and the Triton sampler model all run one."""
    schedule: FoldedSchedule
    engines: Mapping[str, UNetEngine]
    batch_size: int
    conditioner: Conditioner | None = None
    decoder: Callable[[np.ndarray], np.ndarray] | None = None

    def chunk(self, seed: int, start: int, count: int, first_index: int = 0, on_step=None) -> np.ndarray:
        return sample_chunk(self.schedule, self.engines, seed, first_index, start, count, on_step,
                            self.conditioner, self.decoder)

    def generate(self, num: int, seed: int, first_index: int = 0,
                 on_progress: Callable[[int], None] | None = None) -> np.ndarray:
        return generate(self.schedule, self.engines, num, seed, self.batch_size, first_index, on_progress,
                        self.conditioner, self.decoder)
