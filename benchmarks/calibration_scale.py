"""ptqd at Stable Diffusion's sizes: a UNet built from SD 1.5's (or SDXL's) published UNet
configuration (random weights, its real shapes: 860 M parameters, SDXL's 2.6 B), the text
encoders' shapes (CLIP ViT-L/14; SDXL adds OpenCLIP ViT-bigG/14) and SD's VAE, run through the
stages export-trt runs, on this machine.

    .venv/bin/python benchmarks/calibration_scale.py WORK [--latent 16] [--samples 8] [--steps 2]
    .venv/bin/python benchmarks/calibration_scale.py WORK --layout sdxl --depth 6 --skip-memory-runs

SDXL's UNet holds 10 transformer layers in each attention block at 1280 channels (60 of its
70); --depth sets that count, so a UNet that fits this machine's 24 GB can be run (6: 1.7 B
parameters; the full model's memory and time are estimated from it, and say so).

What it does, each stage in its own process (so its wall time and peak resident memory are its
own, read from wait4):
  1. builds the pipeline folder WORK/<layout>-shaped once (the latent size reduced to --latent,
     which changes no weight: a UNet's parameters do not depend on its sample size);
  2. times single UNet calls (guided: a batch of 2) at --latent and at SD's 64x64;
  3. `ptqd calibrate` (nearest rounding, no sensitivity map: the map costs one UNet call per
     layer, ~700 here), `ptqd export`, `ptqd build --backend onnxruntime`, `ptqd deploy`,
     `ptqd lint` on every UNet graph and `ptqd verify`: the graphs pass protobuf's 2 GiB, so they
     are written with external data;
  4. calibrates again at twice --samples and twice --steps together (same --calib-batch), to
     show calibration's peak memory does not grow with them;
  5. prints the tables (markdown) and writes WORK/calibration_scale.json.
The extrapolation to the defaults (50 steps, 128 trajectories, 64x64) multiplies the measured
64x64 call time by the UNet calls the defaults make: an estimate, labelled so.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ptqd.builtin.tiny_pipelines import build_scheduler, build_tokenizer, quiet_libraries

BIN = Path(sys.executable).parent
# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json) but the sample size
SD15_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    mid_block_scale_factor=1, norm_eps=1e-5,
)
# CLIP ViT-L/14's text transformer (SD 1.5's text encoder): 77 tokens, 12 layers of width 768
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
# SD's VAE (8x downsampling)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32)
# SDXL base (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json) but the sample size and,
# with --depth, the transformer layers of its 1280-channel blocks
SDXL_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
)
SDXL_DEPTH = 10
# OpenCLIP ViT-bigG/14's text transformer (SDXL's text_encoder_2): 32 layers of width 1280
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280)
DEFAULTS = dict(steps=50, samples=128, guidance=2)  # calibrate's defaults; guidance doubles every call


def build_pipeline(folder: Path, latent: int, layout: str = "sd15", depth: int = SDXL_DEPTH) -> dict:
    """SD-1.5- or SDXL-shaped random-weight pipeline at `folder` (kept between runs)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if (folder / "model_index.json").is_file():
        info = json.loads((folder / "ptqd_scale.json").read_text())
        if (info["latent"], info.get("depth")) != (latent, depth if layout == "sdxl" else None):
            raise SystemExit(f"{folder} was built at latent size {info['latent']}, depth {info.get('depth')}: "
                             "remove it first")
        return info
    t0 = time.perf_counter()
    staging = folder.with_name(folder.name + ".partial")
    with quiet_libraries(), torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        tokenizer = build_tokenizer(max_length=77)
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        text = CLIPTextModel(CLIPTextConfig(**ids, **SD15_TEXT)).eval()
        vae = AutoencoderKL(sample_size=latent * 8, **SD15_VAE).eval()
        if layout == "sd15":
            unet = UNet2DConditionModel(sample_size=latent, **SD15_UNET).eval()
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                           scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
            texts = [text]
        else:
            tokenizer_2 = build_tokenizer(max_length=77, pad_token="!")
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **SDXL_TEXT_2)).eval()
            unet = UNet2DConditionModel(sample_size=latent, transformer_layers_per_block=(1, 2, depth),
                                        **SDXL_UNET).eval()
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                             tokenizer_2=tokenizer_2, unet=unet, scheduler=build_scheduler(),
                                             add_watermarker=False)
            texts = [text, text_2]
        pipe.save_pretrained(staging)
    info = {"layout": layout, "latent": latent, "depth": depth if layout == "sdxl" else None,
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "text_encoder_parameters": sum(p.numel() for t in texts for p in t.parameters()),
            "vae_parameters": sum(p.numel() for p in vae.parameters()),
            "build_s": round(time.perf_counter() - t0, 1)}
    (staging / "ptqd_scale.json").write_text(json.dumps(info, indent=1) + "\n")
    staging.rename(folder)
    return info


def unet_call_seconds(folder: Path, sizes: list[int], repeats: int = 2) -> dict[int, float]:
    """Best of `repeats` guided UNet calls (batch 2: conditional and unconditional) per latent
    size, made as calibration makes them (the model family's call)."""
    from diffusers import UNet2DConditionModel

    from ptqd.families import family_of_module

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    family, width = family_of_module(unet), unet.config.cross_attention_dim
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.randn(2, 6)}
    out = {}
    with torch.no_grad():
        for size in sizes:
            x, t, text = torch.randn(2, 4, size, size), torch.tensor([999.0, 999.0]), torch.randn(2, 77, width)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                family.forward(unet, x, t, encoder_hidden_states=text, **extra)
                best = min(best, time.perf_counter() - t0)
            out[size] = round(best, 2)
    return out


def run_stage(name: str, args: list[str], log: Path) -> dict:
    """One CLI process: its exit status, wall seconds and peak resident memory (wait4's maxrss)."""
    print(f"[scale] {name}: ptqd {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ ptqd {' '.join(args)}\n")
        f.flush()
        proc = subprocess.Popen([str(BIN / "ptqd"), *args], stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"stage": name, "wall_s": round(time.perf_counter() - t0, 1),
              "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2), "rc": proc.returncode}  # maxrss: KiB
    print(f"[scale] {name}: {result['wall_s']} s, peak {result['peak_rss_gb']} GB, rc {proc.returncode}", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (rc {proc.returncode}); see {log}")
    return result


def graph_sizes(onnx_dir: Path) -> list[dict]:
    rows = []
    for graph in sorted(onnx_dir.glob("*.onnx")):
        data = graph.with_name(graph.name + ".data")
        rows.append({"graph": graph.name, "onnx_mb": round(graph.stat().st_size / 1e6, 2),
                     "data_mb": round(data.stat().st_size / 1e6, 1) if data.exists() else 0.0})
    return rows


def calibrate_args(model: Path, out: Path, samples: int, steps: int, batch: int) -> list[str]:
    return ["calibrate", "--model", str(model), "--steps", str(steps), "--calib-samples", str(samples),
            "--calib-batch", str(batch), "--weight-rounding", "nearest", "--no-sensitivity", "--device", "cpu",
            "--output", str(out), "--force"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="Folder for the pipeline, the outputs and the log (tens of GB).")
    ap.add_argument("--latent", type=int, default=16, help="Latent size of the run (SD 1.5: 64, SDXL: 128).")
    ap.add_argument("--layout", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--depth", type=int, default=SDXL_DEPTH,
                    help=f"sdxl: transformer layers per 1280-channel attention block (published: {SDXL_DEPTH}).")
    ap.add_argument("--samples", type=int, default=8, help="Calibration trajectories of the main run (at least 8).")
    ap.add_argument("--steps", type=int, default=2, help="Steps of the main run.")
    ap.add_argument("--calib-batch", type=int, default=4)
    ap.add_argument("--skip-memory-runs", action="store_true", help="Only the main run's stages.")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "stages.log"
    model = work / f"{args.layout}-shaped"
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                     "torch": torch.__version__, "layout": args.layout, "latent": args.latent, "samples": args.samples,
                     "steps": args.steps, "calib_batch": args.calib_batch}
    t0 = time.perf_counter()
    # in a child process each, so this one holds no model while the stages' memory is measured
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        results["model"] = pool.apply(build_pipeline, (model, args.latent, args.layout, args.depth))
        print(f"[scale] pipeline: {json.dumps(results['model'])} ({time.perf_counter() - t0:.0f} s)", flush=True)
        native = 64 if args.layout == "sd15" else 128
        results["unet_call_s"] = pool.apply(unet_call_seconds, (model, sorted({args.latent, native})))
    print(f"[scale] guided UNet call (batch 2), seconds by latent size: {results['unet_call_s']}", flush=True)

    out = work / "out"
    stages = [run_stage("calibrate", calibrate_args(model, out, args.samples, args.steps, args.calib_batch), log),
              run_stage("export", ["export", str(out), "--force"], log),
              run_stage("build", ["build", str(out), "--backend", "onnxruntime", "--force"], log),
              run_stage("deploy", ["deploy", str(out), "--force"], log)]
    # layout.GRAPH_FILES: unet_<cfg>.onnx is what TensorRT builds; .ort/.cpu are ONNX Runtime's
    unet_graphs = sorted((out / "onnx").glob("unet_*.onnx"))
    trt = [str(p) for p in unet_graphs if p.name.count(".") == 1 and p.name != "unet_fp32.onnx"]
    ort = [str(p) for p in unet_graphs if str(p) not in trt]
    stages.append(run_stage("lint (tensorrt graphs)", ["lint", *trt, "--target", "tensorrt"], log))
    if ort:
        stages.append(run_stage("lint (onnxruntime graphs)", ["lint", *ort, "--target", "onnxruntime"], log))
    stages.append(run_stage("verify", ["verify", str(out)], log))
    results["stages"] = stages
    results["graphs"] = graph_sizes(out / "onnx")

    memory = [{"samples": args.samples, "steps": args.steps, **stages[0]}]
    if not args.skip_memory_runs:
        # both doubled in one run: on this CPU each SD-sized calibration spends ~14 min in the
        # weight-scale search alone (60 candidates x 860 M weights x 2 grids), whatever its size
        for samples, steps in ((2 * args.samples, 2 * args.steps),):
            run = run_stage(f"calibrate {samples} samples x {steps} steps",
                            calibrate_args(model, work / f"calib-{samples}x{steps}", samples, steps, args.calib_batch),
                            log)
            memory.append({"samples": samples, "steps": steps, **run})
    results["calibration_memory"] = memory

    # estimated: UNet calls at the defaults x the measured 64x64 call (one call = one guided sample)
    calls = DEFAULTS["steps"] * DEFAULTS["samples"]
    per_call = results["unet_call_s"][native]
    results["estimated_defaults"] = {
        "fp_trajectory_calls": calls, f"seconds_per_guided_call_{native}": per_call,
        "fp_trajectories_hours": round(calls * per_call / 3600, 1),
        "note": f"estimated: calls x the measured single-sample {native}x{native} guided call on this CPU; each quantized "
                "configuration's PTQD statistics rerun the same calls (one more such block per configuration)"}
    (work / "calibration_scale.json").write_text(json.dumps(results, indent=1) + "\n")

    print("\n| stage | wall s | peak RSS GB |\n|---|---:|---:|")
    for s in stages:
        print(f"| {s['stage']} | {s['wall_s']} | {s['peak_rss_gb']} |")
    print("\n| graph | .onnx MB | .onnx.data MB |\n|---|---:|---:|")
    for g in results["graphs"]:
        print(f"| {g['graph']} | {g['onnx_mb']} | {g['data_mb']} |")
    print("\n| --calib-samples | --steps | calibrate wall s | peak RSS GB |\n|---:|---:|---:|---:|")
    for m in memory:
        print(f"| {m['samples']} | {m['steps']} | {m['wall_s']} | {m['peak_rss_gb']} |")
    print(f"\nestimated at the defaults: {json.dumps(results['estimated_defaults'])}")


if __name__ == "__main__":
    main()
