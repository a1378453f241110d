"""Recompute OUT's PTQD statistics from the exported graphs alone (onnxruntime, no torch in
the loop) and compare them with calibration/ptqd.json.

    .venv/bin/python benchmarks/recompute_stats.py OUT

The FP graph replays the calibration seeds' full-precision trajectory; at every step the
TensorRT-flavour QDQ graph of each configuration sees the same x_t, and k, bias and sigma_q
are re-estimated with the step's recorded correction form.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from ptqd.calibration.data import CALIBRATION_INDEX_OFFSET
from ptqd.calibration.noise_stats import step_stats
from ptqd.runtime.noise import SampleNoise
from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
from ptqd.runtime.schedule import FoldedSchedule, apply_step
from ptqd.ddim import build_schedule
from ptqd.model import load_scheduler_config, resolve_model


def main(out: Path) -> None:
    doc = json.loads((out / "calibration" / "ptqd.json").read_text())
    n, n_fit, steps = doc["calib_samples"], doc["calib_samples"] * 3 // 4, doc["num_inference_steps"]
    shape = FoldedSchedule.load(out / "scheduler").sample_shape
    fp_sched = build_schedule(load_scheduler_config(resolve_model(doc["model"])), steps, doc["eta"],
                              shape, ["fp32"] * steps)
    fp = OnnxRuntimeUNet(out / "onnx" / "unet_fp32.onnx")
    graphs = {c: OnnxRuntimeUNet(out / "onnx" / f"unet_{c}.onnx", float_kernels=True) for c in doc["stats"]}
    diffs = {c: {"k": [], "bias": [], "sigma_q": []} for c in graphs}
    noise = SampleNoise(doc["seed"], CALIBRATION_INDEX_OFFSET, n, tuple(shape))
    x = noise.initial()
    for step in fp_sched.steps:
        t = np.full(n, float(step.timestep), np.float32)
        eps = fp(x, t)
        for cfg, graph in graphs.items():
            ref = doc["stats"][cfg][step.index]
            e, d = torch.from_numpy(eps), torch.from_numpy(graph(x, t) - eps)
            st = step_stats(e[:n_fit], d[:n_fit], e[n_fit:], d[n_fit:], mode=ref["correction"])
            diffs[cfg]["k"].append(abs(st.k - ref["k"]))
            diffs[cfg]["bias"].append(max(abs(a - b) for a, b in zip(st.bias, ref["bias"])))
            diffs[cfg]["sigma_q"].append(abs(st.sigma_q - ref["sigma_q"]) / ref["sigma_q"])
        x = apply_step(fp_sched, step, x, eps, noise.step() if doc["eta"] > 0 else None)
    print(f"{out}: {steps} steps, {n} calibration trajectories, graphs vs calibration/ptqd.json")
    for cfg, d in diffs.items():
        print(f"  {cfg}: max |Δk| {max(d['k']):.4f}, max |Δbias| {max(d['bias']):.5f}, "
              f"max relative Δσ_q {max(d['sigma_q']) * 100:.2f} % "
              f"(mean k {np.mean([s['k'] for s in doc['stats'][cfg]]):.4f})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
