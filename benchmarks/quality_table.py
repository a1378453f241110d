"""The README's quality tables: W8A8 / W4A8 / W4A4 / FP8 / NVFP4 / W4A16, weights rounded to
nearest or reconstructed with GPTQ, with and without PTQD, eta 0 and 1, on a built-in model.

    .venv/bin/python benchmarks/quality_table.py --num 256 --steps 50 [--etas 0,1] [--roundings nearest,gptq]
        [--configs w8a8,w4a8,w4a4,fp8,nvfp4,w4a16] [--model digits | digits-dit]

For each eta and weight rounding: one calibration of the model (w4a8 base, w8a8 and the
--configs beside it; `ptqd calibrate --weight-rounding R --configs w4a4,fp8`, a class model at
its family's guidance scale and all its classes) and its export, then --num samples (seeds
0..num-1, never seen by calibration; image j of a class model asks for class j % 10) per
variant through the ONNX Runtime reference graphs (<denoiser>_<cfg>.ort.onnx: the fake-quant
model's twin, run with float kernels), the whole schedule at one configuration, folded with or
without the PTQD correction: what `ptqd sample OUT --graph reference --precision CFG` runs.
Prints, per variant, the per-sample error to the FP sample of the same seed, the Fréchet
distance to the real digits in the shipped classifier's features, for a class model the
classifier's accuracy (the label asked for against the label it sees), and each calibration's
time.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ptqd.calibration.artifact import load_ptqd_json
from ptqd.calibration.request import CalibrationRequest
from ptqd.evaluation.metrics import DigitFeatures, frechet_distance, per_sample_error, real_digit_features
from ptqd.evaluation.report import asked_labels
from ptqd.model import resolve_model
from ptqd.pipeline import run_calibrate, run_export_stage
from ptqd.runtime.conditioning import PipelineSpec
from ptqd.runtime.layout import CALIBRATION_DIR, SCHEDULER_DIR
from ptqd.sample import SampleRequest, output_sampler

CONFIGS = "w8a8,w4a8,w4a4,fp8"


def sample(out: Path, precision: str, correction: bool, num: int) -> np.ndarray:
    req = SampleRequest(out=out, model=None, num=num, seed=0, steps=None, eta=None, batch_size=64,
                        backend="onnxruntime", npy=None, grid=None, precision=precision, correction=correction,
                        graph="reference")
    return output_sampler(req).generate(num, seed=0)


def calibrate(model: str, out: Path, eta: float, rounding: str, steps: int, calib_samples: int,
              configs: list[str]) -> float:
    t0 = time.perf_counter()
    extra = tuple(c for c in configs if c not in ("w4a8", "w8a8"))
    # priced on a B200, which has every format's tensor cores (nvfp4 needs FP4); the table
    # samples each configuration on every step, so the latency schedule plays no part
    run_calibrate(CalibrationRequest(model=model, steps=steps, eta=eta, calib_samples=calib_samples,
                                     extra_configs=extra, weight_rounding=rounding, target_gpu="b200"),
                  out, force=False)
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
    ap.add_argument("--model", default="digits", help="a built-in model: digits or digits-dit")
    args = ap.parse_args()
    configs = args.configs.split(",")
    features = DigitFeatures(resolve_model(args.model).extras_dir)
    real = real_digit_features(features)
    rows, timings = [], []

    def row(eta, cfg, rounding, corr, imgs, fp, labels):
        err = per_sample_error(imgs, fp) if fp is not None else {"mse": 0.0, "psnr_db": float("inf")}
        acc = float((features.predict(imgs) == labels).mean()) if labels is not None else None
        rows.append((eta, cfg, rounding, corr, err["mse"], err["psnr_db"], frechet_distance(features(imgs), real), acc))
        print(f"  eta {eta:g} {cfg} {rounding} {corr}: MSE {err['mse']:.3e}, PSNR {err['psnr_db']:.2f} dB, "
              f"FD {rows[-1][6]:.3f}" + ("" if acc is None else f", class accuracy {acc:.3f}"), flush=True)

    for eta in [float(e) for e in args.etas.split(",")]:
        fp = None
        for rounding in args.roundings.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                seconds = calibrate(args.model, out, eta, rounding, args.steps, args.calib_samples, configs)
                timings.append((eta, rounding, seconds, load_ptqd_json(out / CALIBRATION_DIR)["weight_rounding"]))
                labels = asked_labels(PipelineSpec.load(out / SCHEDULER_DIR), args.num)
                if fp is None:
                    fp = sample(out, "fp32", True, args.num)
                    row(eta, "fp32", "-", "-", fp, None, labels)
                for cfg in configs:
                    for correction in (False, True):
                        row(eta, cfg, rounding, "PTQD" if correction else "none", sample(out, cfg, correction, args.num),
                            fp, labels)
    classes = labels is not None
    print(f"\n{args.model}: {args.num} samples, {args.steps} DDIM steps, seeds 0..{args.num - 1}, ONNX Runtime "
          "reference graphs\n")
    print("| eta | config | weights | correction | MSE to FP (×1e-3) | PSNR to FP (dB) | Fréchet dist. to real digits |"
          + (" class accuracy |" if classes else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if classes else ""))
    for eta, cfg, rounding, corr, mse, psnr, fd, acc in rows:
        print(f"| {eta:g} | {cfg} | {rounding} | {corr} | {mse * 1e3:.3f} | {psnr:.2f} | {fd:.3f} |"
              + (f" {acc * 100:.1f} % |" if classes else ""))
    print("\n| eta | weights | calibration (s) | of which GPTQ (s) |\n|---|---|---|---|")
    for eta, rounding, seconds, rec in timings:
        print(f"| {eta:g} | {rounding} | {seconds:.1f} | {rec.get('seconds', '-')} |")


if __name__ == "__main__":
    main()
