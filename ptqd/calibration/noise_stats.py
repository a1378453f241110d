"""PTQD's quantization-noise statistics per denoising step (PTQD.md §2).

    delta = eps_q - eps = k eps + b_c + r,   r uncorrelated with eps, std(r) = sigma_q

Measured on the full-precision trajectory: both networks see the same x_t, so the numbers
describe one step's error, not the error accumulated along a quantized trajectory.

Beyond the paper, each step may use a richer correction, chosen only where it lowers the
error of the corrected prediction on held-out trajectories:
- "paper":    k clamped at 0 from below, per-channel bias (the reference code);
- "raw-k":    the least-squares k unclamped (any 1 + k > 0 is valid for the algebra);
- "bias-map": raw k and a per-pixel bias map instead of one value per channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ptqd.calibration.configs import CORRECTIONS


@dataclass
class StepStats:
    k_raw: float
    k: float                    # the k used by the chosen correction
    bias: list[float]           # per channel, for the chosen k
    sigma_q: float              # std of the residual after the chosen correction
    correction: str
    snr_db: float               # E|eps|^2 / E|r|^2 after correction (fit set)
    snr_db_uncorrected: float   # E|eps|^2 / E|delta|^2
    heldout_mse: dict[str, float]
    bias_map: list | None = None  # [C, H, W] when correction == "bias-map"


def least_squares_k(eps: torch.Tensor, delta: torch.Tensor) -> float:
    e, d = eps.double().flatten(), delta.double().flatten()
    e_c, d_c = e - e.mean(), d - d.mean()
    return float((e_c * d_c).sum() / (e_c * e_c).sum().clamp_min(1e-30))


def _fit(eps, delta, k: float, spatial: bool):
    resid = delta.double() - k * eps.double()
    dims = (0,) if spatial else (0, 2, 3)
    bias = resid.mean(dim=dims, keepdim=True)
    return bias, (resid - bias)


def _corrected_mse(eps, eps_q, k, bias) -> float:
    return float((((eps_q.double() - bias) / (1 + k)) - eps.double()).pow(2).mean())


def _db(signal: float, noise: float) -> float:
    return 10 * math.log10(signal / max(noise, 1e-30))


def step_stats(eps_fit, delta_fit, eps_held, delta_held, mode: str = "auto") -> StepStats:
    """Statistics of one step; `mode` is a correction name or "auto" (held-out choice)."""
    k_raw = least_squares_k(eps_fit, delta_fit)
    # 1 + k must stay positive for the correction to be defined; k this low is a broken model
    k_raw = max(k_raw, -0.9)
    candidates = {"paper": (max(k_raw, 0.0), False), "raw-k": (k_raw, False), "bias-map": (k_raw, True)}
    fitted = {n: (k, *_fit(eps_fit, delta_fit, k, spatial)) for n, (k, spatial) in candidates.items()}
    eq_held = eps_held + delta_held
    heldout = {n: _corrected_mse(eps_held, eq_held, k, b) for n, (k, b, _) in fitted.items()}
    heldout["none"] = float(delta_held.double().pow(2).mean())
    chosen = min(CORRECTIONS, key=lambda n: heldout[n]) if mode == "auto" else mode
    k, bias, resid = fitted[chosen]
    signal = float(eps_fit.double().pow(2).mean())
    per_channel = bias.mean(dim=(0, 2, 3)) if bias.dim() == 4 and bias.shape[-1] > 1 else bias.flatten()
    return StepStats(
        k_raw=k_raw, k=k, bias=[float(v) for v in per_channel.flatten()],
        sigma_q=float(resid.std()), correction=chosen,
        snr_db=_db(signal, float(resid.pow(2).mean())),
        snr_db_uncorrected=_db(signal, float(delta_fit.double().pow(2).mean())),
        heldout_mse=heldout,
        bias_map=bias[0].tolist() if chosen == "bias-map" else None)
