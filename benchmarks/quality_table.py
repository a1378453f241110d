"""The README's quality table: W8A8 / W4A8 / W4A4, with and without PTQD, eta 0 and 1.

    .venv/bin/python benchmarks/quality_table.py --num 256 --steps 50 [--etas 0,1]

For each eta: one calibration of the built-in model (configurations w4a8, w8a8, w4a4), then
--num samples (seeds 0..num-1, never seen by calibration) per variant with the torch
fake-quant sampler. Prints, per variant, the per-sample error to the FP sample of the same
seed and the Fréchet distance to the real digits in the shipped classifier's features.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ptqd.calibration.stage import CalibrationRequest
from ptqd.evaluation.metrics import DigitFeatures, frechet_distance, per_sample_error, real_digit_features
from ptqd.model import resolve_model
from ptqd.pipeline import run_calibrate
from ptqd.sample import SampleRequest, sample_output


def sample(out: Path, precision: str, correction: bool, num: int) -> np.ndarray:
    req = SampleRequest(out=out, model=None, num=num, seed=0, steps=None, eta=None, batch_size=128,
                        backend="torch", npy=None, grid=None, precision=precision, correction=correction)
    return sample_output(req)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--etas", default="0,1")
    ap.add_argument("--calib-samples", type=int, default=128)
    args = ap.parse_args()
    features = DigitFeatures(resolve_model("digits").extras_dir)
    real = real_digit_features(features)
    rows = []
    for eta in [float(e) for e in args.etas.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            run_calibrate(CalibrationRequest(model="digits", steps=args.steps, eta=eta,
                                             calib_samples=args.calib_samples, extra_configs=("w4a4",)),
                          out, force=False)
            fp = sample(out, "fp32", True, args.num)
            rows.append((eta, "fp32", "-", 0.0, float("inf"), frechet_distance(features(fp), real)))
            for cfg in ("w8a8", "w4a8", "w4a4"):
                for correction in (False, True):
                    t0 = time.perf_counter()
                    imgs = sample(out, cfg, correction, args.num)
                    err = per_sample_error(imgs, fp)
                    fd = frechet_distance(features(imgs), real)
                    rows.append((eta, cfg, "PTQD" if correction else "none", err["mse"], err["psnr_db"], fd))
                    print(f"  eta {eta:g} {cfg} {'PTQD' if correction else 'none'}: {time.perf_counter() - t0:.0f} s",
                          flush=True)
    print(f"\n{args.num} samples, {args.steps} DDIM steps, seeds 0..{args.num - 1}, torch fake-quant\n")
    print("| eta | config | correction | MSE to FP (×1e-3) | PSNR to FP (dB) | Fréchet dist. to real digits |")
    print("|---|---|---|---|---|---|")
    for eta, cfg, corr, mse, psnr, fd in rows:
        print(f"| {eta:g} | {cfg} | {corr} | {mse * 1e3:.3f} | {psnr:.2f} | {fd:.3f} |")


if __name__ == "__main__":
    main()
