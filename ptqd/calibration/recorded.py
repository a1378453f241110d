"""The recorded trajectories (x_t and eps at every step) kept in a temporary file, not in memory.

They grow with steps x samples x latent size: at Stable Diffusion 1.5's defaults (50 steps,
128 trajectories, 4x64x64 latents) 420 MB each, where everything else calibration holds is
bounded (the activation sample, one batch of UNet activations). Every reader takes one step
(or a block of one step's samples) at a time, so reading through the file keeps calibration's
memory flat in steps and samples. Plain reads, not a memory map: mapped pages would count
toward the process's resident memory again.
"""
from __future__ import annotations

import tempfile

import numpy as np
import torch


class StepTensors:
    """A write-once [steps, samples, *shape] float32 array on disk. Indexing with a step, or a
    step and a slice of samples, reads that block into a new tensor."""

    def __init__(self, steps: int, samples: int, shape: tuple[int, ...]):
        self.shape = (steps, samples, *shape)
        self._row = int(np.prod(shape))  # floats per sample
        self._file = tempfile.TemporaryFile(prefix="ptqd-trajectories-")  # deleted when closed

    def _offset(self, step: int, sample: int) -> int:
        return (step * self.shape[1] + sample) * self._row * 4

    def write(self, step: int, start: int, values: torch.Tensor) -> None:
        """Samples start .. start+len(values)-1 of one step."""
        array = np.ascontiguousarray(values.detach().cpu().numpy(), dtype=np.float32)
        if array.shape[1:] != self.shape[2:] or start + len(array) > self.shape[1]:
            raise ValueError(f"block {array.shape} at sample {start} does not fit {self.shape}")
        self._file.seek(self._offset(step, start))
        array.tofile(self._file)

    def read(self, step: int, start: int = 0, count: int | None = None) -> torch.Tensor:
        count = self.shape[1] - start if count is None else count
        self._file.seek(self._offset(step, start))
        flat = np.fromfile(self._file, dtype=np.float32, count=count * self._row)
        if flat.size != count * self._row:
            raise RuntimeError(f"step {step} samples {start}..{start + count - 1} were never recorded")
        return torch.from_numpy(flat.reshape(count, *self.shape[2:]))

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple):
            step, samples = key
            start, stop, stride = samples.indices(self.shape[1])
            if stride != 1:
                raise IndexError("only contiguous sample blocks are read")
            return self.read(step, start, max(0, stop - start))
        return self.read(key)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        self._file.close()
