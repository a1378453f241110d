"""Seeded noise for sampling, identical whatever the backend, precision or batch size.

Every sample owns a generator seeded with (seed, sample index): sample i of seed S starts
from the same x_T and receives the same per-step noise z whether it is drawn alone or in a
batch of 256, by torch or by onnxruntime, at fp32 or w4a8. That is what makes samples of
different precisions comparable one to one.
"""
from __future__ import annotations

import numpy as np


class SampleNoise:
    def __init__(self, seed: int, first_index: int, count: int, shape: tuple[int, ...]):
        if seed < 0:
            raise ValueError("seed must be non-negative")
        self.shape = tuple(shape)
        self._generators = [np.random.default_rng([seed, first_index + i]) for i in range(count)]

    def _draw(self) -> np.ndarray:
        return np.stack([g.standard_normal(self.shape, dtype=np.float32) for g in self._generators])

    def initial(self) -> np.ndarray:
        """x_T, [count, *shape] float32. Call once, before any step()."""
        return self._draw()

    def step(self) -> np.ndarray:
        """The z of one stochastic step (eta > 0), drawn at every step so streams stay aligned."""
        return self._draw()
