"""The saved PTQD scheduler, driven through diffusers' own API, against DDIMScheduler."""
import pytest
import torch
from diffusers import DDIMScheduler

from ptqd.exporter.diffusers_scheduler import PTQDFoldedScheduler
from ptqd.ddim import build_schedule

CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
          "beta_end": 0.02, "clip_sample": False, "prediction_type": "epsilon"}


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_zero_corrections_reproduce_ddim_through_the_saved_config(tmp_path, eta):
    steps = 25
    PTQDFoldedScheduler.from_schedule(
        build_schedule(CONFIG, steps, eta, [1, 8, 8], ["w4a8"] * steps)).save_pretrained(str(tmp_path))
    ours = PTQDFoldedScheduler.from_pretrained(str(tmp_path))
    ref = DDIMScheduler.from_config(CONFIG)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    gen = torch.Generator().manual_seed(1)
    x_ref = x_ours = torch.randn(2, 1, 8, 8, generator=gen)
    for t in ref.timesteps:
        eps = torch.randn(2, 1, 8, 8, generator=gen)
        z = torch.randn(2, 1, 8, 8, generator=gen)
        x_ref = ref.step(eps, t, x_ref, eta=eta, variance_noise=z).prev_sample
        x_ours = ours.step(eps, t, x_ours, variance_noise=z).prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-4, atol=1e-5)
    assert ours.config_for(ref.timesteps[0]) == "w4a8"


def test_a_schedule_refuses_another_step_count(tmp_path):
    sched = PTQDFoldedScheduler.from_schedule(build_schedule(CONFIG, 10, 0.0, [1, 8, 8], ["w8a8"] * 10))
    with pytest.raises(ValueError, match="calibrated for 10 steps"):
        sched.set_timesteps(50)
