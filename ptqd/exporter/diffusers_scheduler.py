"""The folded PTQD schedule as a diffusers-style scheduler (set_timesteps / step contract,
config saved with save_pretrained), for users who drive a diffusers loop themselves.

Runtimes without torch use `schedule.FoldedSchedule` and the JSON table directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ptqd.runtime.schedule import FoldedSchedule, ScheduleStep, apply_step


@dataclass
class PTQDSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class PTQDFoldedScheduler(SchedulerMixin, ConfigMixin):
    """Runs a fixed folded schedule; `table` is FoldedSchedule's step list as dicts."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, eta: float = 0.0,
                 sample_shape: list | None = None, clip_sample: bool = False,
                 clip_sample_range: float = 1.0, table: list | None = None):
        self.schedule = FoldedSchedule(
            eta=eta, num_train_timesteps=num_train_timesteps, sample_shape=list(sample_shape or []),
            clip_sample=clip_sample, clip_sample_range=clip_sample_range,
            steps=[ScheduleStep(**s) for s in (table or [])])
        self.by_timestep = {s.timestep: s for s in self.schedule.steps}
        self.timesteps = torch.tensor([s.timestep for s in self.schedule.steps], dtype=torch.long)
        self.num_inference_steps = len(self.schedule.steps)
        self.init_noise_sigma = 1.0

    @classmethod
    def from_schedule(cls, schedule: FoldedSchedule) -> "PTQDFoldedScheduler":
        from dataclasses import asdict

        return cls(num_train_timesteps=schedule.num_train_timesteps, eta=schedule.eta,
                   sample_shape=schedule.sample_shape, clip_sample=schedule.clip_sample,
                   clip_sample_range=schedule.clip_sample_range,
                   table=[asdict(s) for s in schedule.steps])

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        if num_inference_steps != self.num_inference_steps:
            raise ValueError(f"this PTQD schedule was calibrated for {self.num_inference_steps} "
                             f"steps, not {num_inference_steps}")

    def config_for(self, timestep) -> str:
        """Which engine (bit configuration) must produce model_output at this timestep."""
        return self.by_timestep[int(timestep)].config

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        step = self.by_timestep[int(timestep)]
        z = None if variance_noise is None else variance_noise.cpu().numpy()
        if z is None and self.schedule.eta > 0 and step.S > 0:
            z = np.random.standard_normal(sample.shape).astype(np.float32)
        out = apply_step(self.schedule, step, sample.detach().cpu().numpy(),
                         model_output.detach().cpu().numpy(), z)
        prev = torch.from_numpy(out).to(sample.device, sample.dtype)
        return PTQDSchedulerOutput(prev_sample=prev) if return_dict else (prev,)
