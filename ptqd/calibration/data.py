"""Timestep-aware calibration data: the full-precision DDIM trajectories of the deployed
scheduler, step count and eta, with the UNet's input and output at every step and a sample
of every quantizable layer's input activation (PTQD.md §1).

Calibration samples use indices far from the ones `ptqd sample` draws (0, 1, 2, ...), so
the seeds a user evaluates on were never seen by the calibration.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ptqd.calibration.configs import DEFAULT_CALIB_BATCH
from ptqd.calibration.layers import quantizable_layers
from ptqd.calibration.recorded import StepTensors
from ptqd.calibration.trajectory import TorchUNetEngine, chunk_engine, ddim_trajectory
from ptqd.conditions import latent_shape
from ptqd.runtime.conditioning import Guided
from ptqd.runtime.noise import SampleNoise

CALIBRATION_INDEX_OFFSET = 1_000_000
# activation values sampled per layer input and output: 2048 per UNet call, at most
# VALUES_PER_LAYER over all trajectories (reached at the defaults, 50 steps x 2 chunks of 64)
VALUES_PER_CALL = 2048
VALUES_PER_LAYER = 204_800
# Samples per UNet call by default (--calib-batch): the trajectories run in chunks of it, the
# PTQD statistics re-run the same chunks, and probes (GPTQ, sensitivity) batch that many
# recorded inputs. Calibration sample j is conditioned on conditions[j % len] in any chunking.
CHUNK = DEFAULT_CALIB_BATCH


@dataclass
class CalibrationData:
    timesteps: list[int]
    x: StepTensors                        # [steps, n, C, H, W]: UNet input x_t (on disk)
    eps: StepTensors                      # [steps, n, C, H, W]: full-precision eps(x_t, t)
    act_values: dict[str, torch.Tensor] = field(default_factory=dict)
    act_absmax: dict[str, float] = field(default_factory=dict)
    # layer outputs: only the CPU-fast ONNX Runtime graph quantizes them (to fuse QLinear ops)
    out_values: dict[str, torch.Tensor] = field(default_factory=dict)
    out_absmax: dict[str, float] = field(default_factory=dict)
    batch: int = CHUNK                    # samples per UNet call (--calib-batch)

    @property
    def num_samples(self) -> int:
        return self.x.shape[1]


class ActivationObserver:
    """Hooks that keep the running |max| and a seeded random sample of each layer's input
    (key "name") and output (key "name:out").

    Memory is bounded: each key holds at most VALUES_PER_LAYER values however many steps and
    samples the trajectories have; past that, `calls` (the number of UNet calls to come) share
    them equally, so every step and every chunk stays represented. Values and maxima stay on
    the UNet's device until `close`."""

    def __init__(self, unet, layers: list[str], seed: int, calls: int):
        keys = [k for n in layers for k in (n, f"{n}:out")]
        self.per_call = min(VALUES_PER_CALL, -(-VALUES_PER_LAYER // max(1, calls)))
        self.size = self.per_call * max(1, calls)
        self.values: dict[str, torch.Tensor | None] = {k: None for k in keys}
        self.filled: dict[str, int] = {k: 0 for k in keys}
        self.absmax: dict[str, torch.Tensor | None] = {k: None for k in keys}
        self.gen = torch.Generator().manual_seed(seed)
        modules = quantizable_layers(unet)
        self.hooks = [modules[n].register_forward_pre_hook(self._hook(n)) for n in layers]
        self.hooks += [modules[n].register_forward_hook(self._out_hook(f"{n}:out")) for n in layers]

    def _record(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().flatten()
        peak = x.abs().max()
        self.absmax[key] = peak if self.absmax[key] is None else torch.maximum(self.absmax[key], peak)
        if self.values[key] is None:
            self.values[key] = torch.empty(self.size, dtype=torch.float32, device=x.device)
        start = self.filled[key]
        count = min(self.per_call, x.numel(), self.values[key].numel() - start)
        if count <= 0:
            return
        idx = torch.randint(0, x.numel(), (count,), generator=self.gen).to(x.device)
        self.values[key][start:start + count] = x[idx]
        self.filled[key] = start + count

    def _hook(self, key):
        return lambda module, inputs: self._record(key, inputs[0])

    def _out_hook(self, key):
        return lambda module, inputs, output: self._record(key, output)

    def close(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        for h in self.hooks:
            h.remove()
        values = {k: v[:self.filled[k]].cpu() for k, v in self.values.items() if v is not None}
        return values, {k: float(m) for k, m in self.absmax.items() if m is not None}


def collect(unet, scheduler_config: dict, steps: int, eta: float, num_samples: int, seed: int,
            layers: list[str], batch_size: int = CHUNK, progress: bool = True,
            conditioner=None) -> CalibrationData:
    shape = tuple(latent_shape(unet))
    xs, eps = StepTensors(steps, num_samples, shape), StepTensors(steps, num_samples, shape)
    timesteps = [0] * steps

    def recorder(start: int):
        def record(index, t, x, e):
            timesteps[index] = t
            xs.write(index, start, x)
            eps.write(index, start, e)
        return record

    observer = ActivationObserver(unet, layers, seed, calls=steps * -(-num_samples // batch_size))
    try:
        with tqdm(total=num_samples * steps, unit="img-step", desc="calibration trajectories",
                  disable=not progress or None, leave=False) as bar:
            for start in range(0, num_samples, batch_size):
                count = min(batch_size, num_samples - start)
                noise = SampleNoise(seed, CALIBRATION_INDEX_OFFSET + start, count, shape)
                ddim_trajectory(chunk_engine(unet, conditioner, start, count), scheduler_config, steps,
                                eta, noise, on_step=recorder(start), progress=lambda: bar.update(count))
    finally:
        values, absmax = observer.close()
    inputs = {k: v for k, v in values.items() if not k.endswith(":out")}
    outputs = {k[:-4]: v for k, v in values.items() if k.endswith(":out")}
    return CalibrationData(timesteps, xs, eps, inputs, {k: absmax[k] for k in inputs},
                           outputs, {k: absmax[f"{k}:out"] for k in outputs}, batch_size)


@dataclass(frozen=True)
class Probe:
    """A block of recorded UNet inputs: calibration samples start .. start+count-1 at one step."""
    step: int
    start: int
    count: int


def probes(data: CalibrationData, total: int, max_steps: int | None = None) -> list[Probe]:
    """About `total` recorded (x_t, t) spread evenly over the steps (at most max_steps of them):
    per step a block of consecutive samples, a different block at each step. Blocks are
    contiguous so that a conditional model's conditions come from one Conditioner chunk."""
    steps, n = len(data.timesteps), data.num_samples
    used = min(steps, total, max_steps or steps)
    per = max(1, min(n, total // used))
    chosen = [round(k * (steps - 1) / max(1, used - 1)) for k in range(used)]
    return [Probe(i, (k * per) % (n - per + 1), per) for k, i in enumerate(chosen)]


def _probe_groups(blocks: list[Probe], limit: int) -> Iterator[list[Probe]]:
    """Blocks packed into groups of at most `limit` inputs; a block larger than that is split
    (into contiguous parts: one conditioner chunk each still)."""
    parts = [Probe(p.step, p.start + k, min(limit, p.count - k)) for p in blocks for k in range(0, p.count, limit)]
    group, size = [], 0
    for p in parts:
        if group and size + p.count > limit:
            yield group
            group, size = [], 0
        group.append(p)
        size += p.count
    if group:
        yield group


@torch.no_grad()
def probe_predictions(unet, data: CalibrationData, blocks: list[Probe],
                      conditioner=None) -> Iterator[tuple[Probe, np.ndarray]]:
    """The model's (guided) eps on each probe's recorded x_t. Blocks of different steps share
    a UNet call (each sample keeps its own timestep and conditions), up to data.batch inputs
    (twice as many samples for a guided model): one call per block of 8 costs the built-in
    model 2.2x as much as one call of 64."""
    engine = TorchUNetEngine(unet)
    for group in _probe_groups(blocks, data.batch):
        x = np.concatenate([data.x[p.step, p.start:p.start + p.count].numpy() for p in group])
        t = np.concatenate([np.full((p.count,), float(data.timesteps[p.step]), dtype=np.float32)
                            for p in group])
        if conditioner is None:
            eps = engine(x, t)
        else:
            parts = [conditioner.chunk_inputs(p.start, p.count) for p in group]
            cond, uncond = ({k: np.concatenate([part[i][k] for part in parts]) for k in parts[0][i]}
                            for i in (0, 1))
            eps = Guided(engine, cond, uncond, conditioner.spec.guidance_scale)(x, t)
        offset = 0
        for p in group:
            yield p, eps[offset:offset + p.count]
            offset += p.count

