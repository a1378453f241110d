"""The full-precision DDIM sampler in PyTorch, driven by diffusers' own DDIMScheduler.

It is the reference every other sampler is compared against, and the source of the
timestep-aware calibration data: `on_step` sees the UNet's input (x_t, t) and its output
(for a conditional model the guided output; the UNet ran on both halves of the guidance).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ptqd.ddim import ddim_scheduler
from ptqd.devices import module_device, to_device
from ptqd.families import family_of_module
from ptqd.runtime.conditioning import decode_images
from ptqd.runtime.noise import SampleNoise

StepHook = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def ddim_trajectory(engine, scheduler_config: dict, steps: int, eta: float, noise: SampleNoise,
                    on_step: StepHook | None = None, progress: Callable[[], None] | None = None):
    """Denoise one batch with a numpy engine (a TorchUNetEngine, guided or not); returns x_0
    as a numpy array in model scale."""
    sched = ddim_scheduler(scheduler_config, steps)
    x = torch.from_numpy(noise.initial())
    for index, t in enumerate(sched.timesteps):
        eps = torch.from_numpy(engine(x.numpy(), np.full((x.shape[0],), float(t), dtype=np.float32)))
        if on_step:
            on_step(index, int(t), x, eps)
        z = torch.from_numpy(noise.step()) if eta > 0 else None
        x = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        if progress:
            progress()
    return x.numpy()


class TorchUNetEngine:
    """A torch denoiser (UNet or transformer, full precision or fake-quant) as a numpy engine
    for the shared sampler loop: its family's call, its output as eps."""

    def __init__(self, unet: torch.nn.Module):
        self.unet, self.device = unet, module_device(unet)
        self.family = family_of_module(unet)

    @torch.no_grad()
    def __call__(self, sample, timestep, **conditioning):
        extra = {k: to_device(v, self.device) for k, v in conditioning.items()}
        out = self.family.forward(self.unet, to_device(sample, self.device), to_device(timestep, self.device),
                                  **extra)
        return out.cpu().numpy()


def chunk_engine(unet, conditioner, start: int, count: int):
    """The torch UNet as the engine for images start .. start+count-1, guided if conditional."""
    engine = TorchUNetEngine(unet)
    return engine if conditioner is None else conditioner.guided(engine, start, count)


def sample_torch_fp(unet, scheduler_config: dict, steps: int, eta: float, num: int, seed: int,
                    batch_size: int, progress: bool = True, conditioner=None, decoder=None) -> np.ndarray:
    from tqdm import tqdm

    from ptqd.conditions import latent_shape

    shape = tuple(latent_shape(unet))
    chunks = []
    with tqdm(total=num * steps, unit="img-step", disable=not progress or None,
              desc="sampling", leave=False) as bar:
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            noise = SampleNoise(seed, start, count, shape)
            x = ddim_trajectory(chunk_engine(unet, conditioner, start, count), scheduler_config, steps,
                                eta, noise, progress=lambda: bar.update(count))
            chunks.append(decode_images(x, decoder))
    return np.concatenate(chunks)
