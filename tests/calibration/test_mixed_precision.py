import itertools
import random

import pytest

from ptqd.calibration.layers import LayerInfo
from ptqd.calibration.configs import BitConfig
from ptqd.calibration.mixed_precision import (Policy, choose_by_budget, choose_by_snr, choose_schedule,
                                              config_bops, fp32_bops)
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
    assert config_bops(layers, BitConfig.parse("w4a8"), ("conv_in",)) == 10 * 32 * 32 + 100 * 4 * 8
    assert fp32_bops(layers) == 110 * 1024


@pytest.mark.parametrize("seed", range(12))
def test_latency_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    configs = ["fp16", "w4a8", "w8a8"][: rng.choice([2, 3])]
    steps = rng.randint(1, 7)
    ns = {c: rng.randint(1000, 9000) for c in configs}          # step latency in whole ns
    latency = {c: v / 1e6 for c, v in ns.items()}                # as the estimate gives it: ms
    noise = {c: [rng.random() for _ in range(steps)] for c in configs}
    snr = {c: [0.0] * steps for c in configs}
    ratio = rng.choice([1.0, 1.1, 1.3, 2.0])
    budget_ns = ratio * min(ns.values()) * steps
    best = min(sum(noise[c][i] for i, c in enumerate(combo))
               for combo in itertools.product(configs, repeat=steps)
               if sum(ns[c] for c in combo) <= budget_ns)
    chosen = choose_schedule(Policy("latency", ratio), configs[0], snr, noise, {c: 1 for c in configs}, latency)
    assert sum(ns[c] for c in chosen) <= budget_ns
    assert sum(noise[c][i] for i, c in enumerate(chosen)) == pytest.approx(best)


def test_latency_policy_takes_the_less_noisy_of_two_equally_fast_configs():
    # w4a8 and w8a8 run the same INT8 kernels: same latency, half the BOPs for w4a8
    noise = {"w4a8": [0.5, 0.4, 0.3], "w8a8": [0.3, 0.1, 0.05], "fp16": [0.0, 0.0, 0.0]}
    snr = {c: [0.0] * 3 for c in noise}
    bops = {"w4a8": 32, "w8a8": 64, "fp16": 1024}
    latency = {"w4a8": 2.0, "w8a8": 2.0, "fp16": 3.0}
    assert choose_schedule(Policy.parse("latency:1"), "w4a8", snr, noise, bops, latency) == ["w8a8"] * 3
    # BOPs at the same ratio keeps the noisier w4a8 everywhere: it "saves" what the GPU never pays
    assert choose_schedule(Policy.parse("budget:1"), "w4a8", snr, noise, bops) == ["w4a8"] * 3
    # room for one FP16 step (3 + 2 + 2 <= 1.2 * 6): it goes where the INT8 noise is largest
    assert choose_schedule(Policy.parse("latency:1.2"), "w4a8", snr, noise, bops, latency) == [
        "fp16", "w8a8", "w8a8"]


def test_latency_policy_without_an_estimate_is_a_user_error():
    noise = {"w4a8": [0.5], "w8a8": [0.1]}
    with pytest.raises(UserError, match="w8a8"):
        choose_schedule(Policy.parse("latency:1.2"), "w4a8", {c: [0.0] for c in noise}, noise,
                        {"w4a8": 1, "w8a8": 2}, {"w4a8": 1.0})


def test_policies_print_as_they_parse():
    assert [str(Policy.parse(t)) for t in ("off", "snr:20", "budget:1.25", "LATENCY:1.2 ")] == [
        "off", "snr:20", "budget:1.25", "latency:1.2"]


@pytest.mark.parametrize("text", ["budget:0.5", "snr", "fast", "budget:x", "budget:1.2.3",
                                  "latency:0.9", "latency:", "latency", "latency:-1", "latency:1.2x"])
def test_bad_policies_are_refused(text):
    with pytest.raises(UserError):
        Policy.parse(text)
