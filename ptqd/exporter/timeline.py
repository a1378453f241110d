"""The DDIM timeline of a model's scheduler, taken from diffusers itself so the folded
schedule uses exactly the timesteps and alphas that DDIMScheduler would."""
from __future__ import annotations

from dataclasses import dataclass

from ptqd.exporter.schedule import FoldedSchedule, fold_step


@dataclass(frozen=True)
class TimelineStep:
    index: int
    timestep: int
    alpha_t: float
    alpha_prev: float


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
    """Fold per-step corrections ({'k', 'bias', 'sigma_q'} per step, None for none)."""
    channels = sample_shape[0]
    schedule = FoldedSchedule(
        eta=float(eta), num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
        sample_shape=list(sample_shape), clip_sample=bool(scheduler_config.get("clip_sample", True)),
        clip_sample_range=float(scheduler_config.get("clip_sample_range", 1.0)))
    for step in ddim_timeline(scheduler_config, steps):
        corr = corrections[step.index] if corrections else None
        k = float(corr["k"]) if corr else 0.0
        bias = corr["bias"] if corr else [0.0] * channels  # per channel, or a [C, H, W] map
        sigma_q = float(corr["sigma_q"]) if corr else 0.0
        schedule.steps.append(fold_step(step.index, step.timestep, configs[step.index],
                                        step.alpha_t, step.alpha_prev, eta, k, bias, sigma_q))
    return schedule
