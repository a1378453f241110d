"""How far apart two Fréchet distances of the same model can lie by chance: the full-precision
built-in model sampled on disjoint seed sets of --num samples each, every set's Fréchet distance
to the real digits (the shipped classifier's features). The spread says how small a difference
in the quality table's FD column is a difference at all.

    .venv/bin/python benchmarks/fd_spread.py --num 256 --sets 6 --steps 50 [--eta 0]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from ptqd.ddim import build_schedule
from ptqd.evaluation.metrics import DigitFeatures, frechet_distance, real_digit_features
from ptqd.exporter.onnx_fp import export_fp_onnx
from ptqd.model import load_model, load_scheduler_config, resolve_model
from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
from ptqd.runtime.sampler import Sampler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--sets", type=int, default=6)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eta", type=float, default=0.0)
    args = ap.parse_args()
    source = resolve_model("digits")
    features = DigitFeatures(source.extras_dir)
    real = real_digit_features(features)
    model = load_model("digits", args.steps)
    schedule = build_schedule(load_scheduler_config(source), args.steps, args.eta, [1, 16, 16],
                              ["fp32"] * args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        graph = export_fp_onnx(model.unet, Path(tmp) / "unet_fp32.onnx")
        sampler = Sampler(schedule, {"fp32": OnnxRuntimeUNet(graph, float_kernels=True)}, batch_size=128)
        fds = []
        for k in range(args.sets):
            # set k: images k*num .. (k+1)*num-1 of seed 0, disjoint from every other set
            images = sampler.generate(args.num, seed=0, first_index=k * args.num)
            fds.append(frechet_distance(features(images), real))
            print(f"set {k} (images {k * args.num}..{(k + 1) * args.num - 1}): FD {fds[-1]:.3f}", flush=True)
    fds = np.array(fds)
    print(f"\nFP, {args.num} samples per set, {args.steps} steps, eta {args.eta:g}: FD mean {fds.mean():.3f}, "
          f"std {fds.std(ddof=1):.3f}, range {fds.min():.3f}..{fds.max():.3f} over {args.sets} disjoint sets")


if __name__ == "__main__":
    main()
