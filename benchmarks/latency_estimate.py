"""Estimated denoiser step latency per configuration on target GPUs (ptqd/calibration/latency.py):
a roofline per layer from datasheet peaks, not a measurement. Printed beside BOPs (the paper's
metric) to show where the two disagree.

    .venv/bin/python benchmarks/latency_estimate.py [--models digits,unet25m] [--gpus h100,l40s] [--batches 1,8]
        [--configs w8a8,w4a8,w4a4,fp8,nvfp4,w4a16] [--schedule nvfp4:40,fp8:10]

`unet25m` is the ~25 M-parameter diffusers UNet2DModel at 32x32 of onnxruntime_int8.py, written
to a temporary folder; `sdxl` is SDXL base's UNet (calibration_scale.py's layout, 2.6 B
parameters) at its 128x128 latent (1024x1024 images), `dit-xl2` DiT-XL/2 at 256x256 (32x32x4
latent, 28 blocks of width 1152, 1,000 classes), both built in memory. All random weights: the
estimate depends on shapes only. A configuration a GPU has no tensor cores for (fp8 on the
A100, nvfp4 before Blackwell) is left out on that GPU. --schedule prices a step mix: its steps'
estimates summed, against as many all-FP16 steps.

    .venv/bin/python benchmarks/latency_estimate.py --save-dit FOLDER [--dit-layers 2]

writes DiT-XL/2's transformer at --dit-layers of its 28 blocks (every layer its published
shape; random weights) as a DiTPipeline folder with a small VAE, for `ptqd calibrate --model
FOLDER`: a model whose per-layer costs are DiT-XL/2's, small enough to calibrate on a CPU.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnxruntime_int8 import make_unet25m  # noqa: E402

import torch  # noqa: E402

from ptqd.calibration.configs import BitConfig  # noqa: E402
from ptqd.calibration.gpus import GPUS, format_peak, gpu_spec  # noqa: E402
from ptqd.calibration.latency import estimate_step_latency, float_ops_ms, same_cost  # noqa: E402
from ptqd.calibration.layers import measure_float_ops, measure_layers  # noqa: E402
from ptqd.calibration.mixed_precision import config_bops  # noqa: E402
from ptqd.conditions import latent_shape  # noqa: E402
from ptqd.families import family_of_module  # noqa: E402
from ptqd.errors import UserError  # noqa: E402
from ptqd.model import load_denoiser, resolve_model  # noqa: E402
from ptqd.runtime.formats import KERNELS  # noqa: E402

CONFIGS = "w8a8,w4a8,w4a4,fp8,nvfp4,w4a16"


def _sdxl_unet():
    from calibration_scale import SDXL_DEPTH, SDXL_UNET
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=128, transformer_layers_per_block=(1, 2, SDXL_DEPTH), **SDXL_UNET)
    # one sample's conditioning: 77 tokens of both encoders' 2048 features, the pooled 1280 and 6 time ids
    return unet, {"encoder_hidden_states": torch.zeros(1, 77, 2048), "text_embeds": torch.zeros(1, 1280),
                  "time_ids": torch.zeros(1, 6)}


def _dit_xl2(layers: int = 28):
    from diffusers import DiTTransformer2DModel

    # facebook/DiT-XL-2-256 transformer/config.json
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=layers, patch_size=2, sample_size=32, num_embeds_ada_norm=1000,
                                  norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                                  norm_elementwise_affine=False, upcast_attention=False)
    return model, {"class_labels": torch.zeros(1, dtype=torch.long)}


def save_dit(folder: Path, layers: int) -> None:
    from diffusers import DDIMScheduler, DiTPipeline

    from ptqd.builtin.tiny_pipelines import build_vae

    if folder.exists():
        raise SystemExit(f"{folder} exists")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        transformer = _dit_xl2(layers)[0].eval()
        scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
        DiTPipeline(transformer=transformer, vae=build_vae(), scheduler=scheduler).save_pretrained(folder)
    print(f"wrote {folder}: DiT-XL/2 at {layers} blocks, {sum(p.numel() for p in transformer.parameters()):,} "
          "parameters (random weights)")


def load(name: str, tmp: Path):
    """(denoiser, one sample's conditioning or None)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        if name == "sdxl":
            return _sdxl_unet()
        if name == "dit-xl2":
            return _dit_xl2()
    spec = str(make_unet25m(tmp / name)) if name == "unet25m" else name
    return load_denoiser(resolve_model(spec)), None


def _priced(config: str, gpu: str) -> bool:
    target = gpu_spec(gpu)
    try:
        for kernel in BitConfig.parse(config).kernels:
            format_peak(target, KERNELS[kernel].rate)
    except UserError:
        return False
    return True


def report(name: str, unet, conditioning, gpus: list[str], batches: list[int], all_configs: list[str],
           schedule: dict[str, int]) -> None:
    unet = unet.eval()
    shape = tuple(latent_shape(unet))
    keep = family_of_module(unet).default_keep
    layers, ops = measure_layers(unet, shape, conditioning), measure_float_ops(unet, shape, conditioning)
    params = sum(p.numel() for p in unet.parameters())
    macs = sum(layer.macs for layer in layers) + sum(c.macs for c in ops.attention)
    print(f"\n## {name}: {params / 1e6:.2f} M parameters, input {list(shape)}, "
          f"{macs / 1e9:.3f} GMACs/sample ({len(layers)} Conv/Linear, {len(ops.attention)} attention cores), "
          f"kept in FP16: {', '.join(keep)}")
    kinds = {k: sum(layer.macs for layer in layers if layer.kind == k) for k in ("conv", "linear")}
    print(f"Conv/Linear MACs: {kinds['linear'] / max(1, sum(kinds.values())) * 100:.0f} % in Linear layers")
    bops = {c: config_bops(layers, BitConfig.parse(c), keep) for c in all_configs}
    for gpu in gpus:
        configs = [c for c in all_configs if _priced(c, gpu)]
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
            if schedule and all(c in lat for c in schedule):
                total = sum(lat[c] * n for c, n in schedule.items())
                steps = sum(schedule.values())
                mix = ", ".join(f"{c}x{n}" for c, n in schedule.items())
                print(f"  schedule {mix}: {total:.3f} ms for {steps} steps vs all-FP16 {lat['fp16'] * steps:.3f} ms "
                      f"({lat['fp16'] * steps / total:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,unet25m")
    ap.add_argument("--gpus", default="h100,l40s", help=f"any of {', '.join(GPUS)}")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--schedule", default="", help="a step mix to price, e.g. nvfp4:40,fp8:10")
    ap.add_argument("--save-dit", type=Path, default=None, help="write DiT-XL/2 at --dit-layers blocks here, and stop")
    ap.add_argument("--dit-layers", type=int, default=2)
    args = ap.parse_args()
    if args.save_dit is not None:
        save_dit(args.save_dit, args.dit_layers)
        return
    gpus, batches = args.gpus.split(","), [int(b) for b in args.batches.split(",")]
    schedule = {c: int(n) for c, n in (item.split(":") for item in args.schedule.split(",") if item)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            report(name, *load(name, Path(tmp)), gpus, batches, args.configs.split(","), schedule)


if __name__ == "__main__":
    main()
