"""The folded PTQD scheduler: per step the affine update a runtime applies (PTQD.md §3-4).

    x_{i+1} = A_i x_i + B_i eps_q + C_i,c + S_i z
    A = sqrt(a_p / a_t),  B = c' / (1 + k),  C_c = -c' b_c / (1 + k),  S = sigma'
    c(s) = sqrt(1 - a_p - s^2) - sqrt(a_p (1 - a_t) / a_t)
    sigma'^2 = sigma^2 - c(sigma)^2 (sigma_q / (1 + k))^2, clamped at 0

With k = b = sigma_q = 0 this is diffusers' DDIMScheduler step. When the model's scheduler
clips the x0 prediction the step is not affine; the table then keeps a_t, a_p, k, b and
sigma' and `apply_step` uses the same formulas around the clip.

Numpy only: the sampler and the Triton model apply it at run time; calibration folds steps
with it to weigh each configuration's leftover noise.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ptqd.runtime.layout import SCHEDULE_FILE

FORMAT_VERSION = 1


@dataclass
class ScheduleStep:
    index: int
    timestep: int
    config: str           # the engine (bit configuration) that runs this step
    alpha_t: float
    alpha_prev: float
    k: float
    bias: list            # per output channel [C], or a per-pixel map [C][H][W]
    sigma_q: float
    sigma: float          # DDIM's sigma_t for the deployed eta
    sigma_prime: float    # after variance-schedule calibration
    A: float
    B: float
    C: list               # same shape as bias
    S: float


@dataclass
class FoldedSchedule:
    eta: float
    num_train_timesteps: int
    sample_shape: list[int]           # [channels, height, width]
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    steps: list[ScheduleStep] = field(default_factory=list)

    @property
    def configs(self) -> list[str]:
        return sorted({s.config for s in self.steps})

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SCHEDULE_FILE
        doc = {"format_version": FORMAT_VERSION, **asdict(self)}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> "FoldedSchedule":
        path = Path(folder) / SCHEDULE_FILE
        doc = json.loads(path.read_text())
        if doc.pop("format_version", None) != FORMAT_VERSION:
            raise ValueError(f"{path}: unknown schedule format")
        steps = [ScheduleStep(**s) for s in doc.pop("steps")]
        return cls(**doc, steps=steps)


def ddim_sigma(alpha_t: float, alpha_prev: float, eta: float) -> float:
    return eta * math.sqrt((1 - alpha_prev) / (1 - alpha_t)) * math.sqrt(1 - alpha_t / alpha_prev)


def ddim_eps_coefficient(alpha_t: float, alpha_prev: float, sigma: float) -> float:
    """c(s): the coefficient of eps in x_prev once x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    return math.sqrt(max(0.0, 1 - alpha_prev - sigma * sigma)) - math.sqrt(
        alpha_prev * (1 - alpha_t) / alpha_t)


def calibrated_sigma(alpha_t: float, alpha_prev: float, sigma: float, k: float, sigma_q: float) -> float:
    """PTQD's variance-schedule calibration: the sampler's own noise absorbs the residual."""
    leftover = ddim_eps_coefficient(alpha_t, alpha_prev, sigma) * sigma_q / (1 + k)
    return math.sqrt(max(0.0, sigma * sigma - leftover * leftover))


def fold_step(index: int, timestep: int, config: str, alpha_t: float, alpha_prev: float,
              eta: float, k: float, bias: list[float], sigma_q: float) -> ScheduleStep:
    if not 1 + k > 0:
        raise ValueError(f"step {index}: 1 + k must be positive, got k={k}")
    sigma = ddim_sigma(alpha_t, alpha_prev, eta)
    sigma_p = calibrated_sigma(alpha_t, alpha_prev, sigma, k, sigma_q)
    c = ddim_eps_coefficient(alpha_t, alpha_prev, sigma_p)
    return ScheduleStep(
        index=index, timestep=int(timestep), config=config, alpha_t=alpha_t, alpha_prev=alpha_prev,
        k=k, bias=list(bias), sigma_q=sigma_q, sigma=sigma, sigma_prime=sigma_p,
        A=math.sqrt(alpha_prev / alpha_t), B=c / (1 + k),
        C=(np.asarray(bias, dtype=np.float64) * (-c / (1 + k))).tolist(), S=sigma_p,
    )


def _as_image_term(values: list) -> np.ndarray:
    """[C] or [C, H, W] -> an array that broadcasts against [N, C, H, W]."""
    arr = np.asarray(values, dtype=np.float32)
    return arr[None, :, None, None] if arr.ndim == 1 else arr[None]


def apply_step(schedule: FoldedSchedule, step: ScheduleStep, x: np.ndarray, eps: np.ndarray,
               z: np.ndarray | None) -> np.ndarray:
    """One denoising step on numpy arrays [N, C, H, W]; z is None when eta == 0."""
    if schedule.clip_sample:
        return _clipped_step(schedule, step, x, eps, z)
    out = step.A * x + step.B * eps
    term = _as_image_term(step.C)
    if term.any():
        out = out + term
    if z is not None and step.S > 0:
        out = out + step.S * z
    return out.astype(np.float32, copy=False)


def _clipped_step(schedule, step, x, eps, z):
    eps_hat = (eps - _as_image_term(step.bias)) / (1 + step.k)
    x0 = (x - math.sqrt(1 - step.alpha_t) * eps_hat) / math.sqrt(step.alpha_t)
    x0 = np.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    direction = math.sqrt(max(0.0, 1 - step.alpha_prev - step.sigma_prime ** 2))
    out = math.sqrt(step.alpha_prev) * x0 + direction * eps_hat
    if z is not None and step.S > 0:
        out = out + step.S * z
    return out.astype(np.float32, copy=False)
