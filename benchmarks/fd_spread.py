"""How much the Fréchet distance of full-precision samples moves from one set of seeds to
another: the noise floor against which a quantized model's FD difference is judged.

    .venv/bin/python benchmarks/fd_spread.py --graph ptqd-out/onnx/unet_fp32.onnx --num 256 --seeds 5 --etas 0,1

For each eta, --seeds disjoint sample sets (seed 0, 1, ...; sample i of seed S, the same
samples `ptqd sample --seed S` draws), --num samples each, 50 DDIM steps of the built-in model's
FP32 graph in ONNX Runtime; FD to the real digits in the shipped classifier's features.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ptqd.ddim import build_schedule
from ptqd.evaluation.metrics import DigitFeatures, frechet_distance, real_digit_features
from ptqd.model import load_scheduler_config, resolve_model
from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
from ptqd.runtime.sampler import Sampler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graph", type=Path, required=True)
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--etas", default="0,1")
    args = ap.parse_args()
    source = resolve_model("digits")
    features = DigitFeatures(source.extras_dir)
    real = real_digit_features(features)
    engine = OnnxRuntimeUNet(args.graph, float_kernels=True)
    for eta in (float(e) for e in args.etas.split(",")):
        schedule = build_schedule(load_scheduler_config(source), args.steps, eta, [1, 16, 16], ["fp32"] * args.steps)
        fds = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            images = Sampler(schedule, {"fp32": engine}, batch_size=128).generate(args.num, seed=seed)
            fds.append(frechet_distance(features(images), real))
            print(f"eta {eta:g} seed {seed}: FD {fds[-1]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        f = np.array(fds)
        print(f"eta {eta:g}: FD over {args.seeds} seed sets of {args.num}: mean {f.mean():.3f}, std {f.std(ddof=1):.3f}, "
              f"range {f.min():.3f}..{f.max():.3f}", flush=True)


if __name__ == "__main__":
    main()
