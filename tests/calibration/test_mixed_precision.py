import itertools
import random

import pytest

from ptqd.calibration.layers import LayerInfo
from ptqd.calibration.mixed_precision import (Policy, choose_by_budget, choose_by_snr, config_bops,
                                              fp32_bops)
from ptqd.errors import UserError


@pytest.mark.parametrize("seed", range(12))
def test_budget_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    configs = ["w4a4", "w4a8", "w8a8"][: rng.choice([2, 3])]
    steps = rng.randint(1, 7)
    bops = {c: rng.randint(1, 9) * 100 for c in configs}
    noise = {c: [rng.random() for _ in range(steps)] for c in configs}
    budget = rng.uniform(min(bops.values()), max(bops.values())) * steps
    best = None
    for combo in itertools.product(configs, repeat=steps):
        if sum(bops[c] for c in combo) <= budget:
            total = sum(noise[c][i] for i, c in enumerate(combo))
            best = total if best is None else min(best, total)
    chosen = choose_by_budget(noise, bops, budget)
    assert sum(bops[c] for c in chosen) <= budget
    assert sum(noise[c][i] for i, c in enumerate(chosen)) == pytest.approx(best)


def test_budget_below_cheapest_is_a_user_error():
    with pytest.raises(UserError, match="budget"):
        choose_by_budget({"a": [1.0, 1.0]}, {"a": 10}, 15)


def test_snr_threshold_picks_the_cheapest_config_that_reaches_it():
    snr = {"w4a8": [30.0, 12.0, 5.0], "w8a8": [40.0, 25.0, 9.0]}
    bops = {"w4a8": 1, "w8a8": 2}
    # step 2: nothing reaches 20 dB, so the best available (w8a8) runs it
    assert choose_by_snr(snr, bops, 20.0) == ["w4a8", "w8a8", "w8a8"]


def test_bops_count_kept_layers_at_32_bits():
    layers = [LayerInfo("conv_in", "conv", 10), LayerInfo("mid.conv", "conv", 100)]
    assert config_bops(layers, 4, 8, ("conv_in",)) == 10 * 32 * 32 + 100 * 4 * 8
    assert fp32_bops(layers) == 110 * 1024


@pytest.mark.parametrize("text", ["budget:0.5", "snr", "fast", "budget:x"])
def test_bad_policies_are_refused(text):
    with pytest.raises(UserError):
        Policy.parse(text)
