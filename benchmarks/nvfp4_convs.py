"""What nvfp4's convolutions should run in: FP8 (ptqd's choice) or FP16, measured on a built-in
model. TensorRT has no FP4 convolution, so an nvfp4 configuration's convolutions take another
format; this prices both choices: accuracy (per-sample error to FP and Fréchet distance, the
ONNX Runtime reference graphs, no PTQD correction so that both use the same statistics-free
sampler) and estimated step latency on a B200.

    .venv/bin/python benchmarks/nvfp4_convs.py [--model digits] [--num 256] [--steps 50]

One calibration (`--format nvfp4 --target-gpu b200`, GPTQ) gives both variants: the FP16-conv
one is the same parameters with the convolutions left out (kept in float), exported again.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from ptqd.calibration.configs import BitConfig
from ptqd.calibration.latency import estimate_step_latency
from ptqd.calibration.layers import layer_kind, measure_float_ops, measure_layers, quantizable_layers
from ptqd.calibration.params import PARAMS_JSON, load_params, save_params
from ptqd.calibration.request import CalibrationRequest
from ptqd.conditions import latent_shape
from ptqd.evaluation.metrics import DigitFeatures, frechet_distance, per_sample_error, real_digit_features
from ptqd.model import load_denoiser, resolve_model
from ptqd.pipeline import run_calibrate, run_export_stage
from ptqd.runtime.layout import CALIBRATION_DIR

from quality_table import sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits")
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    source = resolve_model(args.model)
    unet = load_denoiser(source)
    convs = tuple(n for n, m in quantizable_layers(unet).items() if layer_kind(m) == "conv")
    features = DigitFeatures(source.extras_dir)
    real = real_digit_features(features)
    with tempfile.TemporaryDirectory() as tmp:
        fp8_convs, fp16_convs = Path(tmp) / "fp8-convs", Path(tmp) / "fp16-convs"
        run_calibrate(CalibrationRequest(model=args.model, format="nvfp4", bits=4, act_bits=4, steps=args.steps,
                                         target_gpu="b200", sensitivity=False), fp8_convs, force=False)
        shutil.copytree(fp8_convs / CALIBRATION_DIR, fp16_convs / CALIBRATION_DIR)
        params = load_params(fp16_convs / CALIBRATION_DIR)
        nvfp4 = params["nvfp4"]
        for name in convs:
            if nvfp4.layers.pop(name, None) is not None:
                nvfp4.kept.append(name)
        keep = tuple(json.loads((fp16_convs / CALIBRATION_DIR / PARAMS_JSON).read_text())["keep_patterns"])
        save_params(fp16_convs / CALIBRATION_DIR, list(params.values()), keep)
        for out in (fp8_convs, fp16_convs):
            run_export_stage(out, force=False)
        fp = sample(fp8_convs, "fp32", False, args.num)
        shape = tuple(latent_shape(unet))
        layers, ops = measure_layers(unet, shape), measure_float_ops(unet, shape)
        print(f"\n{args.model}: {args.num} samples, {args.steps} DDIM steps, nvfp4 without PTQD's correction, "
              "ONNX Runtime reference graphs (measured); step latency on B200, batch 1 (estimated)\n")
        print("| nvfp4 convolutions | MSE to FP (×1e-3) | PSNR to FP (dB) | Fréchet dist. (FP: "
              f"{frechet_distance(features(fp), real):.3f}) | µs per step (est.) |\n|---|---|---|---|---|")
        for label, out, kept in (("FP8", fp8_convs, keep), ("FP16", fp16_convs, keep + convs)):
            images = sample(out, "nvfp4", False, args.num)
            err = per_sample_error(images, fp)
            lat = estimate_step_latency(layers, ops, [BitConfig.parse("nvfp4").name], kept, gpu="b200")
            print(f"| {label} | {err['mse'] * 1e3:.3f} | {err['psnr_db']:.2f} | "
                  f"{frechet_distance(features(images), real):.3f} | {lat['nvfp4'] * 1e3:.2f} |")
        print(f"| (all-FP16 engine) | - | - | - | {lat['fp16'] * 1e3:.2f} |")


if __name__ == "__main__":
    main()
