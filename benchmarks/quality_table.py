"""The README's quality table: W8A8 / W4A8 / W4A4 / FP8, weights rounded to nearest or
reconstructed with GPTQ, with and without PTQD, eta 0 and 1.

    .venv/bin/python benchmarks/quality_table.py --num 256 --steps 50 [--etas 0,1] [--roundings nearest,gptq]
        [--configs w8a8,w4a8,w4a4,fp8]

For each eta and weight rounding: one calibration of the built-in model (w4a8 base, w8a8 and
the --configs beside it; `ptqd calibrate --weight-rounding R --configs w4a4,fp8`) and its export, then --num
samples (seeds 0..num-1, never seen by calibration) per variant through the ONNX Runtime
reference graphs (unet_<cfg>.ort.onnx: the fake-quant model's twin, run with float kernels),
the whole schedule at one configuration, folded with or without the PTQD correction. Prints,
per variant, the per-sample error to the FP sample of the same seed and the Fréchet distance
to the real digits in the shipped classifier's features, and each calibration's time.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ptqd.calibration.artifact import load_ptqd_json, steps_and_corrections
from ptqd.calibration.request import CalibrationRequest
from ptqd.ddim import build_schedule
from ptqd.evaluation.metrics import DigitFeatures, frechet_distance, per_sample_error, real_digit_features
from ptqd.model import load_scheduler_config, resolve_model
from ptqd.pipeline import run_calibrate, run_export_stage
from ptqd.runtime.layout import CALIBRATION_DIR, ONNX_DIR, graph_path
from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
from ptqd.runtime.sampler import Sampler

CONFIGS = "w8a8,w4a8,w4a4,fp8"


def sample(out: Path, precision: str, correction: bool, num: int) -> np.ndarray:
    doc = load_ptqd_json(out / CALIBRATION_DIR)
    configs, corrections = steps_and_corrections(doc, precision, correction)
    schedule = build_schedule(load_scheduler_config(resolve_model(doc["model"])), doc["num_inference_steps"],
                              doc["eta"], [1, 16, 16], configs, corrections)
    flavour = "tensorrt" if precision == "fp32" else "onnxruntime"   # fp32: unet_fp32.onnx
    engine = OnnxRuntimeUNet(graph_path(out / ONNX_DIR, precision, flavour), float_kernels=True)
    return Sampler(schedule, {precision: engine}, batch_size=128).generate(num, seed=0)


def calibrate(out: Path, eta: float, rounding: str, steps: int, calib_samples: int, configs: list[str]) -> float:
    t0 = time.perf_counter()
    extra = tuple(c for c in configs if c not in ("w4a8", "w8a8"))
    run_calibrate(CalibrationRequest(model="digits", steps=steps, eta=eta, calib_samples=calib_samples,
                                     extra_configs=extra, weight_rounding=rounding), out, force=False)
    seconds = time.perf_counter() - t0
    run_export_stage(out, force=False)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--etas", default="0,1")
    ap.add_argument("--roundings", default="nearest,gptq")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--configs", default=CONFIGS)
    args = ap.parse_args()
    configs = args.configs.split(",")
    features = DigitFeatures(resolve_model("digits").extras_dir)
    real = real_digit_features(features)
    rows, timings = [], []
    for eta in [float(e) for e in args.etas.split(",")]:
        fp = None
        for rounding in args.roundings.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                seconds = calibrate(out, eta, rounding, args.steps, args.calib_samples, configs)
                timings.append((eta, rounding, seconds, load_ptqd_json(out / CALIBRATION_DIR)["weight_rounding"]))
                if fp is None:
                    fp = sample(out, "fp32", True, args.num)
                    rows.append((eta, "fp32", "-", "-", 0.0, float("inf"), frechet_distance(features(fp), real)))
                    print(f"  eta {eta:g} fp32: FD {rows[-1][6]:.3f}", flush=True)
                for cfg in configs:
                    for correction in (False, True):
                        imgs = sample(out, cfg, correction, args.num)
                        err = per_sample_error(imgs, fp)
                        rows.append((eta, cfg, rounding, "PTQD" if correction else "none", err["mse"],
                                     err["psnr_db"], frechet_distance(features(imgs), real)))
                        print(f"  eta {eta:g} {cfg} {rounding} {rows[-1][3]}: MSE {err['mse']:.3e}, "
                              f"PSNR {err['psnr_db']:.2f} dB, FD {rows[-1][6]:.3f}", flush=True)
    print(f"\n{args.num} samples, {args.steps} DDIM steps, seeds 0..{args.num - 1}, ONNX Runtime reference graphs\n")
    print("| eta | config | weights | correction | MSE to FP (×1e-3) | PSNR to FP (dB) | Fréchet dist. to real digits |")
    print("|---|---|---|---|---|---|---|")
    for eta, cfg, rounding, corr, mse, psnr, fd in rows:
        print(f"| {eta:g} | {cfg} | {rounding} | {corr} | {mse * 1e3:.3f} | {psnr:.2f} | {fd:.3f} |")
    print("\n| eta | weights | calibration (s) | of which GPTQ (s) |\n|---|---|---|---|")
    for eta, rounding, seconds, rec in timings:
        print(f"| {eta:g} | {rounding} | {seconds:.1f} | {rec.get('seconds', '-')} |")


if __name__ == "__main__":
    main()
