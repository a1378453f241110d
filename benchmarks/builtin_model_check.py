"""Is a built-in model producing digits? Prints what the independent judge sees.

    .venv/bin/python benchmarks/builtin_model_check.py --num 256
    .venv/bin/python benchmarks/builtin_model_check.py --model digits-dit --num 200 --guidance 1,1.5,2,3,4

digits: samples the full-precision model (seed 0, 50 DDIM steps) with both backends, times
them, and judges the torch samples with scikit-learn's SVC trained on the real 8x8 digits
(tests/digits_judge.py): class spread, and distance to the nearest real digit against a null
of the same pixels shuffled. digits-dit (class-conditional): per guidance scale, torch
samples asked for 0..9 in turn, and how often the shipped classifier and the SVC judge see
the digit asked for, with the Fréchet distance to the real digits in the shipped
classifier's features.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ptqd.sample import SampleRequest, sample_full_precision  # noqa: E402
from tests.digits_judge import judge, nearest_real_distance, to_8x8  # noqa: E402


def class_model(model_name: str, num: int, scales: list[float]) -> None:
    from ptqd.calibration.trajectory import sample_torch_fp
    from ptqd.conditions import pipeline_spec, torch_conditioner
    from ptqd.evaluation.metrics import DigitFeatures, frechet_distance, real_digit_features
    from ptqd.model import load_model

    model = load_model(model_name, 50)
    features = DigitFeatures(model.source.extras_dir)
    real = real_digit_features(features)
    clf, _, _ = judge()
    asked = np.arange(num) % 10
    print("| guidance | shipped classifier | SVC judge | Fréchet distance | seconds |\n|---|---|---|---|---|")
    for scale in scales:
        spec = pipeline_spec(model, scale, tuple(range(10)))
        t0 = time.perf_counter()
        images = sample_torch_fp(model.denoiser, model.scheduler_config, 50, 0.0, num, 0, 64, progress=False,
                                 conditioner=torch_conditioner(model, spec))
        shipped = (features.predict(images) == asked).mean()
        svc = (clf.predict(to_8x8(images)) == asked).mean()
        print(f"| {scale:g} | {shipped * 100:.1f} % | {svc * 100:.1f} % | {frechet_distance(features(images), real):.2f} "
              f"| {time.perf_counter() - t0:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--model", default="digits", help="digits, or digits-dit (class-conditional)")
    ap.add_argument("--guidance", default="1.5", help="digits-dit: guidance scales, comma-separated")
    args = ap.parse_args()
    if args.model != "digits":
        class_model(args.model, args.num, [float(g) for g in args.guidance.split(",")])
        return
    images = {}
    for backend in ("torch", "onnxruntime"):
        req = SampleRequest(out=None, model=None, num=args.num, seed=0, steps=50, eta=0.0,
                            batch_size=64, backend=backend, npy=None, grid=None)
        t0 = time.perf_counter()
        images[backend] = sample_full_precision(req)
        print(f"{backend:12s} {args.num} samples x 50 steps: {time.perf_counter() - t0:.1f} s")
    diff = np.abs(images["torch"] - images["onnxruntime"])
    print(f"torch vs onnxruntime: mean abs diff {diff.mean():.2e}, max {diff.max():.2e}")
    clf, acc, real = judge()
    flat = to_8x8(images["torch"])
    counts = np.bincount(clf.predict(flat), minlength=10)
    null = np.random.default_rng(0).permuted(flat, axis=1)
    print(f"judge (SVC on real 8x8 digits) held-out accuracy: {acc:.3f}")
    print(f"predicted classes of the samples: {counts.tolist()}")
    print(f"mean distance to nearest real digit: samples {nearest_real_distance(flat, real).mean():.3f}, "
          f"shuffled-pixel null {nearest_real_distance(null, real).mean():.3f}, "
          f"real digits to others {_real_self_distance(real):.3f}")


def _real_self_distance(real: np.ndarray) -> float:
    d2 = (real**2).sum(1)[:, None] - 2 * real @ real.T + (real**2).sum(1)[None]
    np.fill_diagonal(d2, np.inf)
    return float(np.sqrt(np.maximum(d2.min(1), 0)).mean())


if __name__ == "__main__":
    main()
