"""The folded schedule against diffusers' own DDIMScheduler, and PTQD's formulas by hand."""
import math

import numpy as np
import pytest
import torch

from ptqd.runtime.schedule import FoldedSchedule, apply_step, calibrated_sigma, fold_step
from ptqd.ddim import build_schedule, ddim_scheduler


def _scheduler_config(clip: bool) -> dict:
    return {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
            "beta_end": 0.02, "clip_sample": clip, "prediction_type": "epsilon"}


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_zero_corrections_reproduce_diffusers_ddim_step_for_step(eta, clip):
    cfg = _scheduler_config(clip)
    steps = 20
    table = build_schedule(cfg, steps, eta, [3, 8, 8], ["fp32"] * steps)
    ref = ddim_scheduler(cfg, steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    x_ours = x.numpy().copy()
    assert [s.timestep for s in table.steps] == ref.timesteps.tolist()
    for step, t in zip(table.steps, ref.timesteps):
        eps = torch.randn(4, 3, 8, 8, generator=gen) * 1.5
        z = torch.randn(4, 3, 8, 8, generator=gen)
        x = ref.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        x_ours = apply_step(table, step, x_ours, eps.numpy(), z.numpy() if eta > 0 else None)
        # fed the same x each step so an error cannot hide by accumulating or cancelling
        np.testing.assert_allclose(x_ours, x.numpy(), rtol=1e-4, atol=1e-5)
        x_ours = x.numpy().copy()


def test_folding_matches_ptqd_formulas_by_hand():
    a_t, a_p, eta, k, b, sq = 0.3, 0.5, 1.0, 0.1, 0.02, 0.2
    s = fold_step(0, 500, "w4a8", a_t, a_p, eta, k, [b], sq)
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
    c = math.sqrt(1 - a_p - sigma**2) - math.sqrt(a_p * (1 - a_t) / a_t)
    sigma_p = math.sqrt(sigma**2 - (c * sq / (1 + k)) ** 2)
    c_p = math.sqrt(1 - a_p - sigma_p**2) - math.sqrt(a_p * (1 - a_t) / a_t)
    assert s.sigma == pytest.approx(sigma) and s.S == pytest.approx(sigma_p)
    assert s.A == pytest.approx(math.sqrt(a_p / a_t))
    assert s.B == pytest.approx(c_p / (1 + k))
    assert s.C[0] == pytest.approx(-c_p * b / (1 + k))


def test_variance_calibration_clamps_at_zero():
    # residual larger than the sampler's own noise: sigma' is 0, never imaginary
    assert calibrated_sigma(0.3, 0.5, 0.01, 0.0, 5.0) == 0.0
    assert calibrated_sigma(0.3, 0.5, 0.0, 0.0, 0.1) == 0.0


def test_corrected_step_equals_ddim_on_corrected_eps():
    """A_i x + B_i eps_q + C_i is DDIM applied to (eps_q - b) / (1 + k) when eta = 0."""
    cfg = _scheduler_config(False)
    corr = [{"k": 0.05, "bias": [0.01, -0.02], "sigma_q": 0.1}] * 10
    table = build_schedule(cfg, 10, 0.0, [2, 4, 4], ["w4a8"] * 10, corr)
    plain = build_schedule(cfg, 10, 0.0, [2, 4, 4], ["w4a8"] * 10)
    rng = np.random.default_rng(0)
    x, eps_q = rng.standard_normal((2, 2, 4, 4), dtype=np.float32), rng.standard_normal((2, 2, 4, 4), dtype=np.float32)
    eps_hat = (eps_q - np.array([0.01, -0.02], np.float32)[None, :, None, None]) / 1.05
    for s_corr, s_plain in zip(table.steps, plain.steps):
        np.testing.assert_allclose(apply_step(table, s_corr, x, eps_q, None),
                                   apply_step(plain, s_plain, x, eps_hat, None), rtol=1e-5, atol=1e-5)


def test_schedule_round_trips_through_its_file(tmp_path):
    table = build_schedule(_scheduler_config(False), 5, 1.0, [1, 4, 4], ["w4a8", "w8a8"] * 2 + ["fp32"])
    table.save(tmp_path)
    again = FoldedSchedule.load(tmp_path)
    assert again == table and again.configs == ["fp32", "w4a8", "w8a8"]
