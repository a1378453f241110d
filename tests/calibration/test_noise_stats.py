"""PTQD statistics recovered from synthetic data with known k, bias and sigma."""
import pytest
import torch

from ptqd.calibration.noise_stats import least_squares_k, step_stats


def _synthetic(k, bias, sigma, n=64, seed=0, spatial_bias=None):
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, len(bias), 16, 16, generator=gen)
    b = torch.tensor(bias).reshape(1, -1, 1, 1)
    delta = k * eps + b + sigma * torch.randn(eps.shape, generator=gen)
    if spatial_bias is not None:
        delta = delta + spatial_bias
    return eps, delta


def _split(eps, delta, n_fit):
    return eps[:n_fit], delta[:n_fit], eps[n_fit:], delta[n_fit:]


@pytest.mark.parametrize("k, bias, sigma", [(0.05, [0.02, -0.01, 0.0], 0.1), (0.3, [0.1], 0.02)])
def test_paper_statistics_recover_known_values(k, bias, sigma):
    eps, delta = _synthetic(k, bias, sigma)
    st = step_stats(*_split(eps, delta, 48), mode="paper")
    assert st.k == pytest.approx(k, abs=0.01)
    assert st.bias == pytest.approx(bias, abs=0.01)
    assert st.sigma_q == pytest.approx(sigma, rel=0.03)
    assert st.snr_db > st.snr_db_uncorrected


def test_paper_clamps_negative_k_and_raw_k_keeps_it():
    eps, delta = _synthetic(-0.2, [0.0], 0.05)
    paper = step_stats(*_split(eps, delta, 48), mode="paper")
    raw = step_stats(*_split(eps, delta, 48), mode="raw-k")
    assert paper.k == 0.0 and raw.k == pytest.approx(-0.2, abs=0.01)
    assert raw.k_raw == paper.k_raw
    # held-out error says the unclamped k is better here, so auto picks it
    auto = step_stats(*_split(eps, delta, 48), mode="auto")
    assert auto.correction in ("raw-k", "bias-map")
    assert auto.heldout_mse["raw-k"] < 0.2 * min(auto.heldout_mse["paper"], auto.heldout_mse["none"])


def test_bias_map_is_chosen_only_when_the_bias_has_spatial_structure():
    flat_eps, flat_delta = _synthetic(0.1, [0.05], 0.1, n=256)
    assert step_stats(*_split(flat_eps, flat_delta, 192)).correction != "bias-map"
    ramp = torch.linspace(-0.3, 0.3, 16).reshape(1, 1, 1, 16).expand(1, 1, 16, 16)
    eps, delta = _synthetic(0.1, [0.05], 0.1, n=256, spatial_bias=ramp)
    st = step_stats(*_split(eps, delta, 192))
    assert st.correction == "bias-map"
    assert torch.tensor(st.bias_map)[0, 0].tolist() == pytest.approx((ramp[0, 0, 0] + 0.05).tolist(), abs=0.03)


def test_least_squares_k_is_cov_over_var():
    eps, delta = _synthetic(0.4, [0.0], 0.0)
    assert least_squares_k(eps, delta) == pytest.approx(0.4, abs=1e-6)
