"""Full 50-step sampling: diffusers' own DDIMPipeline (PyTorch FP32) vs ptqd's sampler on
ONNX Runtime FP32 vs ptqd's sampler on the mixed INT8/INT4 schedule (CPU-fast graphs).

    .venv/bin/python benchmarks/sampling.py [--models digits,unet25m] [--batches 1,8]

Each variant runs in its own process (peak memory is that process's VmHWM). Sampler
overhead is the loop's own time per step: total minus the time inside engine calls.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = 50


def run_diffusers(model_spec: str, out: Path, batch: int) -> dict:
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler

    from ptqd.model import load_model

    model = load_model(model_spec, STEPS)
    pipe = DDIMPipeline(unet=model.denoiser, scheduler=DDIMScheduler.from_config(model.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=batch, num_inference_steps=2, output_type="np")  # warm-up
    t0 = time.perf_counter()
    with torch.no_grad():
        pipe(batch_size=batch, num_inference_steps=STEPS, eta=0.0, output_type="np",
             generator=torch.Generator().manual_seed(0))
    return {"seconds": time.perf_counter() - t0, "engine_seconds": None}


class TimedEngine:
    def __init__(self, engine):
        self.engine, self.seconds = engine, 0.0

    def __call__(self, sample, timestep):
        t0 = time.perf_counter()
        out = self.engine(sample, timestep)
        self.seconds += time.perf_counter() - t0
        return out


def run_ptqd(model_spec: str, out: Path, batch: int, mixed: bool) -> dict:
    from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
    from ptqd.runtime.sampler import generate
    from ptqd.runtime.schedule import FoldedSchedule
    from ptqd.runtime.layout import graph_path

    schedule = FoldedSchedule.load(out / "scheduler")
    if not mixed:
        from ptqd.ddim import build_schedule
        from ptqd.model import load_scheduler_config, resolve_model

        cfg = load_scheduler_config(resolve_model(model_spec))
        schedule = build_schedule(cfg, STEPS, 0.0, schedule.sample_shape, ["fp32"] * STEPS)
    engines = {c: TimedEngine(OnnxRuntimeUNet(graph_path(out / "onnx", c, "cpu-fast")))
               for c in schedule.configs}
    generate(schedule, engines, batch, 0, batch)  # warm-up (first-run allocations)
    for e in engines.values():
        e.seconds = 0.0
    t0 = time.perf_counter()
    generate(schedule, engines, batch, 0, batch)
    return {"seconds": time.perf_counter() - t0, "engine_seconds": sum(e.seconds for e in engines.values())}


def _child(kind: str, model_spec: str, out: str, batch: int) -> dict:
    runner = {"diffusers PyTorch FP32": lambda: run_diffusers(model_spec, Path(out), batch),
              "ptqd ONNX Runtime FP32": lambda: run_ptqd(model_spec, Path(out), batch, mixed=False),
              "ptqd ONNX Runtime mixed": lambda: run_ptqd(model_spec, Path(out), batch, mixed=True)}[kind]
    result = runner()
    result["peak_mib"] = peak_rss_mib()
    return result


def peak_rss_mib() -> float:
    """This process's own peak RSS. Not getrusage's ru_maxrss: Linux carries it across
    execve, so a spawned child would report its (torch-laden) parent's peak."""
    with open("/proc/self/status") as fh:
        line = next(l for l in fh if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def prepare(model_spec: str, work: Path, calib_samples: int) -> Path:
    from ptqd.calibration.request import CalibrationRequest
    from ptqd.pipeline import run_build_stage, run_calibrate, run_export_stage

    out = work / "out"
    run_calibrate(CalibrationRequest(model=model_spec, bits=4, act_bits=8, steps=STEPS,
                                     calib_samples=calib_samples), out, force=False)
    run_export_stage(out, force=False)
    run_build_stage(out, "onnxruntime", "1,4,8", force=False)
    return out


def main() -> None:
    from onnxruntime_int8 import make_unet25m

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits,unet25m")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models.split(","):
            work = Path(tmp) / label
            work.mkdir()
            spec = str(make_unet25m(work / "model")) if label == "unet25m" else label
            out = prepare(spec, work, calib_samples=32 if label == "digits" else 16)
            schedule = __import__("json").loads((out / "scheduler" / "ptqd_schedule.json").read_text())
            mix = sorted({s["config"] for s in schedule["steps"]})
            for batch in [int(b) for b in args.batches.split(",")]:
                for kind in ("diffusers PyTorch FP32", "ptqd ONNX Runtime FP32", "ptqd ONNX Runtime mixed"):
                    with ctx.Pool(1) as pool:
                        r = pool.apply(_child, (kind, spec, str(out), batch))
                    overhead = None if r["engine_seconds"] is None else (r["seconds"] - r["engine_seconds"]) / STEPS
                    rows.append((label, batch, kind, r, overhead))
                    print(f"  {label} batch {batch} {kind}: {r['seconds']:.1f} s", flush=True)
            print(f"  {label}: mixed schedule uses {', '.join(mix)}")
    print(f"\n{STEPS} DDIM steps, eta 0, onnxruntime / torch on the CPU\n")
    print("| model | batch | sampler | s / image | ms / step | peak memory | sampler overhead / step |")
    print("|---|---|---|---|---|---|---|")
    for label, batch, kind, r, overhead in rows:
        ov = "-" if overhead is None else f"{overhead * 1e3:.2f} ms ({overhead / (r['seconds'] / STEPS) * 100:.1f} %)"
        print(f"| {label} | {batch} | {kind} | {r['seconds'] / batch:.2f} | {r['seconds'] / STEPS * 1e3:.1f} | "
              f"{r['peak_mib']:.0f} MiB | {ov} |")


if __name__ == "__main__":
    main()
