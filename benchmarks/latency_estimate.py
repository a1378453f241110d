"""Estimated UNet step latency per configuration on target GPUs (ptqd/calibration/latency.py):
a roofline per layer from datasheet peaks, not a measurement. Printed beside BOPs (the paper's
metric) to show where the two disagree.

    .venv/bin/python benchmarks/latency_estimate.py [--models digits,unet25m] [--gpus h100,l40s] [--batches 1,8]

`unet25m` is the ~25 M-parameter diffusers UNet2DModel at 32x32 of onnxruntime_int8.py
(random weights: the estimate depends on shapes only), written to a temporary folder.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnxruntime_int8 import make_unet25m  # noqa: E402

from ptqd.calibration.configs import BitConfig  # noqa: E402
from ptqd.calibration.gpus import GPUS, gpu_spec  # noqa: E402
from ptqd.calibration.latency import estimate_step_latency, float_ops_ms, same_cost  # noqa: E402
from ptqd.calibration.layers import measure_float_ops, measure_layers  # noqa: E402
from ptqd.calibration.mixed_precision import config_bops  # noqa: E402
from ptqd.conditions import latent_shape  # noqa: E402
from ptqd.families import family_of_module  # noqa: E402
from ptqd.model import load_denoiser, resolve_model  # noqa: E402

CONFIGS = ("w8a8", "w4a8", "w4a4", "fp8")


def load(name: str, tmp: Path):
    spec = str(make_unet25m(tmp / name)) if name == "unet25m" else name
    return load_denoiser(resolve_model(spec))


def report(name: str, unet, gpus: list[str], batches: list[int]) -> None:
    shape = tuple(latent_shape(unet))
    keep = family_of_module(unet).default_keep
    layers, ops = measure_layers(unet, shape), measure_float_ops(unet, shape)
    params = sum(p.numel() for p in unet.parameters())
    macs = sum(layer.macs for layer in layers) + sum(c.macs for c in ops.attention)
    print(f"\n## {name}: {params / 1e6:.2f} M parameters, input {list(shape)}, "
          f"{macs / 1e9:.3f} GMACs/sample ({len(layers)} Conv/Linear, {len(ops.attention)} attention cores), "
          f"kept in FP16: {', '.join(keep)}")
    bops = {c: config_bops(layers, *_bits(c), keep) for c in CONFIGS if c.startswith("w")}
    for gpu in gpus:
        configs = [c for c in CONFIGS if c != "fp8" or gpu_spec(gpu).fp8_tflops is not None]
        for batch in batches:
            lat = estimate_step_latency(layers, ops, configs, keep, batch, gpu)
            rest = float_ops_ms(ops, batch, gpu)
            print(f"\n{gpu_spec(gpu).label}, batch {batch} (estimated; float ops outside Conv/Linear "
                  f"{rest * 1e3:.1f} us = {rest / lat['fp16'] * 100:.0f} % of fp16)")
            print(f"  {'config':7} {'us/step':>9} {'vs fp16':>8} {'BOPs/step':>10}")
            for config, ms in lat.items():
                b = f"{bops[config]:10.3e}" if config in bops else f"{'-':>10}"
                print(f"  {config:7} {ms * 1e3:9.2f} {lat['fp16'] / ms:7.2f}x {b}")
            groups = same_cost({c: v for c, v in lat.items() if c != "fp16"})
            print("  same cost within 1 %: " + ("; ".join(" = ".join(g) for g in groups) or "none"))


def _bits(config: str) -> tuple[int, int]:
    bits = BitConfig.parse(config)
    return bits.weight_bits, bits.act_bits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,unet25m")
    ap.add_argument("--gpus", default="h100,l40s", help=f"any of {', '.join(GPUS)}")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    gpus, batches = args.gpus.split(","), [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            report(name, load(name, Path(tmp)), gpus, batches)


if __name__ == "__main__":
    main()
