"""How much the Fréchet distance moves from one set of seeds to another, for full precision
and, paired on the same seeds, for a quantized schedule: the noise against which an FD
difference between the two is judged.

    .venv/bin/python benchmarks/fd_spread.py OUT --precision w4a8 --num 256 --seeds 5

OUT is an export of the built-in model (`export-trt --no-report` or `ptqd calibrate` + `ptqd
export`). For --seeds disjoint sample sets (seed 0, 1, ...: the samples `ptqd sample --seed S`
draws), --num samples each, at OUT's steps and eta: FP32 through unet_fp32.onnx and the
--precision configuration at every step with the PTQD correction through its ONNX Runtime
reference graph (the fake-quant model's twin, float kernels); FD to the real digits in the
shipped classifier's features, and the paired difference.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ptqd.calibration.artifact import load_ptqd_json, steps_and_corrections
from ptqd.ddim import build_schedule
from ptqd.evaluation.metrics import DigitFeatures, frechet_distance, real_digit_features
from ptqd.model import load_scheduler_config, resolve_model
from ptqd.runtime.layout import CALIBRATION_DIR, ONNX_DIR, graph_path
from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
from ptqd.runtime.sampler import Sampler


def sampler(out: Path, precision: str) -> Sampler:
    doc = load_ptqd_json(out / CALIBRATION_DIR)
    configs, corrections = steps_and_corrections(doc, precision, correction=precision != "fp32")
    schedule = build_schedule(load_scheduler_config(resolve_model(doc["model"])), doc["num_inference_steps"],
                              doc["eta"], [1, 16, 16], configs, corrections)
    flavour = "tensorrt" if precision == "fp32" else "onnxruntime"   # fp32: unet_fp32.onnx
    engine = OnnxRuntimeUNet(graph_path(out / ONNX_DIR, precision, flavour), float_kernels=True)
    return Sampler(schedule, {precision: engine}, batch_size=128)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--precision", default="w4a8")
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    features = DigitFeatures(resolve_model("digits").extras_dir)
    real = real_digit_features(features)
    samplers = {p: sampler(args.out, p) for p in ("fp32", args.precision)}
    fds = {p: [] for p in samplers}
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        for p, s in samplers.items():
            fds[p].append(frechet_distance(features(s.generate(args.num, seed=seed)), real))
        print(f"seed {seed}: FD fp32 {fds['fp32'][-1]:.3f}, {args.precision}+PTQD {fds[args.precision][-1]:.3f}, "
              f"difference {fds[args.precision][-1] - fds['fp32'][-1]:+.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    fp, q = np.array(fds["fp32"]), np.array(fds[args.precision])
    d = q - fp
    print(f"over {args.seeds} seed sets of {args.num}: FD fp32 mean {fp.mean():.3f} std {fp.std(ddof=1):.3f}; "
          f"difference mean {d.mean():+.3f} std {d.std(ddof=1):.3f}, range {d.min():+.3f}..{d.max():+.3f}")


if __name__ == "__main__":
    main()
