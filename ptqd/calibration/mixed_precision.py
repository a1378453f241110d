"""Step-aware mixed precision (PTQD.md §5): which bit configuration runs each step.

Cost of a configuration: BOPs = sum over Conv/Linear layers of MACs * b_w * b_a, with
layers kept in float counted at 32 x 32. Noise of a configuration at a step: the variance
its leftover residual adds to x_{t-1}, (B_t sigma_q)^2, where B_t is the folded
coefficient of eps at that step.

Policies: "off" (the base configuration everywhere), "snr:<dB>" (per step the cheapest
configuration whose SNR after correction reaches the threshold), "budget:<ratio>" (least
total noise with total BOPs at most ratio x the base configuration's, solved exactly),
"latency:<ratio>" (least total noise with total estimated step latency on the target GPU at
most ratio x the fastest candidate's on every step, latency.py, solved by the same DP).

BOPs are the paper's metric; latency is what a GPU pays: w4a8 counts half the BOPs of w8a8
but runs the same INT8 kernels, so only "latency:" stops trading accuracy for a saving that
never happens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ptqd.errors import UserError

if TYPE_CHECKING:  # torch-free at run time: request.py parses --mixed-precision before torch loads
    from ptqd.calibration.layers import LayerInfo

FLOAT_BITS = 32
POLICY_KINDS = ("snr", "budget", "latency")
RATIO_KINDS = ("budget", "latency")
# the DP keys states on integer totals: latencies (ms, floats) become whole nanoseconds, so
# equal sums are equal keys and the budget test is exact
NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class Policy:
    kind: str          # "off", "snr", "budget", "latency"
    value: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Policy":
        text = text.strip().lower()
        if text == "off":
            return cls("off")
        match = re.fullmatch(rf"({'|'.join(POLICY_KINDS)}):(\d+(?:\.\d*)?|\.\d+)", text)
        if not match:
            raise UserError(f"--mixed-precision {text!r}: expected off, snr:<dB>, budget:<ratio> "
                            "or latency:<ratio>")
        kind, value = match.group(1), float(match.group(2))
        if kind in RATIO_KINDS and value < 1.0:
            reference = "the base configuration" if kind == "budget" else "the fastest configuration"
            raise UserError(f"--mixed-precision {kind} ratio must be >= 1 (1 = {reference} on every step)")
        return cls(kind, value)

    def __str__(self) -> str:
        return self.kind if self.kind == "off" else f"{self.kind}:{self.value:g}"


def config_bops(layers: list[LayerInfo], config, keep: tuple[str, ...]) -> int:
    """MACs x weight bits x activation bits over the layers, each at its kind's bits in the
    configuration (a BitConfig: nvfp4's convolutions are fp8); layers that stay float FP32."""
    total = 0
    for layer in layers:
        own = config.for_kind(layer.kind)
        bw, ba = (FLOAT_BITS, FLOAT_BITS) if config.stays_float(layer, keep) else (own.weight_bits, own.act_bits)
        total += layer.macs * bw * ba
    return total


def fp32_bops(layers: list[LayerInfo]) -> int:
    return sum(layer.macs for layer in layers) * FLOAT_BITS * FLOAT_BITS


def choose_by_snr(snr_db: dict[str, list[float]], bops: dict[str, int], threshold: float) -> list[str]:
    by_cost = sorted(snr_db, key=lambda c: bops[c])
    steps = len(next(iter(snr_db.values())))
    schedule = []
    for i in range(steps):
        ok = [c for c in by_cost if snr_db[c][i] >= threshold]
        schedule.append(ok[0] if ok else max(by_cost, key=lambda c: snr_db[c][i]))
    return schedule


def choose_by_budget(noise: dict[str, list[float]], bops: dict[str, int], budget: float) -> list[str]:
    """Least total noise with total BOPs <= budget: an exact DP over steps whose states are
    the distinct totals spent so far, keeping only states not dominated in (cost, noise)."""
    configs = sorted(noise)
    steps = len(noise[configs[0]])
    states: dict[int, tuple[float, tuple[str, ...]]] = {0: (0.0, ())}
    for i in range(steps):
        nxt: dict[int, tuple[float, tuple[str, ...]]] = {}
        for cost, (total, path) in states.items():
            for c in configs:
                new_cost, new_total = cost + bops[c], total + noise[c][i]
                if new_cost > budget:
                    continue
                if new_cost not in nxt or new_total < nxt[new_cost][0]:
                    nxt[new_cost] = (new_total, path + (c,))
        states = _pareto(nxt)
        if not states:
            raise UserError("the BOPs budget is below the cheapest configuration on every step")
    return list(min(states.values(), key=lambda s: s[0])[1])


def _pareto(states):
    kept, best = {}, float("inf")
    for cost in sorted(states):
        if states[cost][0] < best:
            kept[cost], best = states[cost], states[cost][0]
    return kept


def latency_units(latency: dict[str, float], configs) -> dict[str, int]:
    """Each configuration's estimated step latency (ms) in whole nanoseconds."""
    missing = [c for c in configs if c not in latency]
    if missing:
        raise UserError(f"--mixed-precision latency: no latency estimate for {', '.join(sorted(missing))}")
    return {c: round(latency[c] * NS_PER_MS) for c in configs}


def choose_by_latency(noise: dict[str, list[float]], latency: dict[str, float], ratio: float) -> list[str]:
    """Least total noise with total latency <= ratio x the fastest candidate's on every step."""
    cost = latency_units(latency, noise)
    steps = len(next(iter(noise.values())))
    return choose_by_budget(noise, cost, ratio * min(cost.values()) * steps)


def choose_schedule(policy: Policy, base: str, snr_db: dict[str, list[float]],
                    noise: dict[str, list[float]], bops: dict[str, int],
                    latency: dict[str, float] | None = None) -> list[str]:
    """One configuration per step. `latency`: estimated (or measured) ms per step and
    configuration, needed by the latency policy only."""
    steps = len(snr_db[base])
    if policy.kind == "off":
        return [base] * steps
    if policy.kind == "snr":
        return choose_by_snr(snr_db, bops, policy.value)
    if policy.kind == "latency":
        return choose_by_latency(noise, latency or {}, policy.value)
    return choose_by_budget(noise, bops, policy.value * bops[base] * steps)
