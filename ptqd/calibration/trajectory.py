"""The full-precision DDIM sampler in PyTorch, driven by diffusers' own DDIMScheduler.

It is the reference every other sampler is compared against, and the source of the
timestep-aware calibration data: `on_step` sees the UNet's input (x_t, t) and its output.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ptqd.engines.noise import SampleNoise
from ptqd.engines.sampler import to_images
from ptqd.exporter.timeline import ddim_scheduler

StepHook = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def ddim_trajectory(unet, scheduler_config: dict, steps: int, eta: float, noise: SampleNoise,
                    on_step: StepHook | None = None, progress: Callable[[], None] | None = None):
    """Denoise one batch; returns x_0 as a numpy array in model scale."""
    sched = ddim_scheduler(scheduler_config, steps)
    x = torch.from_numpy(noise.initial())
    for index, t in enumerate(sched.timesteps):
        eps = unet(x, t.expand(x.shape[0]).float()).sample
        if on_step:
            on_step(index, int(t), x, eps)
        z = torch.from_numpy(noise.step()) if eta > 0 else None
        x = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        if progress:
            progress()
    return x.numpy()


def sample_torch_fp(unet, scheduler_config: dict, steps: int, eta: float, num: int, seed: int,
                    batch_size: int, progress: bool = True) -> np.ndarray:
    from tqdm import tqdm

    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    shape = (cfg.in_channels, size, size)
    chunks = []
    with tqdm(total=num * steps, unit="img-step", disable=not progress or None,
              desc="sampling", leave=False) as bar:
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            noise = SampleNoise(seed, start, count, shape)
            x = ddim_trajectory(unet, scheduler_config, steps, eta, noise,
                                progress=lambda: bar.update(count))
            chunks.append(to_images(x))
    return np.concatenate(chunks)
