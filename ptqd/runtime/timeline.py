"""A DDIM timeline (per step: timestep, alpha_t, alpha_prev) folded with PTQD's per-step
corrections into the schedule a runtime applies. The timeline itself comes from diffusers'
DDIMScheduler (ptqd.ddim) once, at export; a folded table holds it again, so the runtime never
needs diffusers: it reads the table, and refolds it for another precision or without the
correction (`refold`)."""
from __future__ import annotations

from dataclasses import dataclass

from ptqd.runtime.schedule import FoldedSchedule, fold_step


@dataclass(frozen=True)
class TimelineStep:
    index: int
    timestep: int
    alpha_t: float
    alpha_prev: float


def fold_timeline(timeline: list[TimelineStep], scheduler_config: dict, eta: float, sample_shape: list[int],
                  configs: list[str], corrections: list[dict] | None = None) -> FoldedSchedule:
    """Fold per-step corrections ({'k', 'bias', 'sigma_q'} per step, None for none)."""
    channels = sample_shape[0]
    schedule = FoldedSchedule(
        eta=float(eta), num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
        sample_shape=list(sample_shape), clip_sample=bool(scheduler_config.get("clip_sample", True)),
        clip_sample_range=float(scheduler_config.get("clip_sample_range", 1.0)))
    for step in timeline:
        corr = corrections[step.index] if corrections else None
        k = float(corr["k"]) if corr else 0.0
        bias = corr["bias"] if corr else [0.0] * channels  # per channel, or a [C, H, W] map
        sigma_q = float(corr["sigma_q"]) if corr else 0.0
        schedule.steps.append(fold_step(step.index, step.timestep, configs[step.index],
                                        step.alpha_t, step.alpha_prev, eta, k, bias, sigma_q))
    return schedule


def refold(schedule: FoldedSchedule, configs: list[str], corrections: list[dict] | None = None) -> FoldedSchedule:
    """The same DDIM steps (timesteps, alphas, eta, clipping) as `schedule`, folded with other
    configurations and corrections: what `ptqd sample OUT --precision ... --no-correction` runs,
    without diffusers (the table's floats are the ones ptqd.ddim took from DDIMScheduler)."""
    timeline = [TimelineStep(s.index, s.timestep, s.alpha_t, s.alpha_prev) for s in schedule.steps]
    config = {"num_train_timesteps": schedule.num_train_timesteps, "clip_sample": schedule.clip_sample,
              "clip_sample_range": schedule.clip_sample_range}
    return fold_timeline(timeline, config, schedule.eta, schedule.sample_shape, configs, corrections)
