"""The DDIM timeline of a model's scheduler, taken from diffusers itself so the folded
schedule uses exactly the timesteps and alphas that DDIMScheduler would. The torch side
(calibration's trajectories, the exporter, `ptqd sample`) reads it here; the numpy runtime
only ever sees the folded table."""
from __future__ import annotations

from ptqd.runtime.schedule import FoldedSchedule
from ptqd.runtime.timeline import TimelineStep, fold_timeline


def ddim_scheduler(scheduler_config: dict, steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    return sched


def ddim_timeline(scheduler_config: dict, steps: int) -> list[TimelineStep]:
    sched = ddim_scheduler(scheduler_config, steps)
    ratio = sched.config.num_train_timesteps // sched.num_inference_steps
    alphas = sched.alphas_cumprod.double()
    out = []
    for i, t in enumerate(sched.timesteps.tolist()):
        prev = t - ratio
        alpha_prev = float(alphas[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
        out.append(TimelineStep(i, int(t), float(alphas[t]), alpha_prev))
    return out


def build_schedule(scheduler_config: dict, steps: int, eta: float, sample_shape: list[int],
                   configs: list[str], corrections: list[dict] | None = None) -> FoldedSchedule:
    """The folded schedule of `steps` DDIM steps, with per-step corrections
    ({'k', 'bias', 'sigma_q'} per step, None for none) and the configuration of each step."""
    return fold_timeline(ddim_timeline(scheduler_config, steps), scheduler_config, eta, sample_shape,
                         configs, corrections)
