"""w4a16 on ONNX Runtime's CPU: the FP32 graph, w4a16's reference graph (blocked INT4
DequantizeLinear, float MatMul, run with float kernels as the sampler's reference does) and its
CPU-fast graph (com.microsoft::MatMulNBits), timed per denoiser call at batch 1 and 8 on the
same inputs, with each graph's distance from the FP32 graph's output and its file size.

    .venv/bin/python benchmarks/w4a16_cpu.py OUT [--repeats 30] [--batches 1,8]

OUT is an export holding w4a16 (e.g. `ptqd calibrate --model digits-dit --bits 4 --act-bits 16`
then `ptqd export OUT`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from ptqd.runtime.conditioning import PipelineSpec
from ptqd.runtime.layout import SCHEDULER_DIR, graph_path
from ptqd.runtime.onnxruntime import create_session


def feeds(session, batch: int, rng: np.random.Generator) -> dict:
    """Random inputs of the graph's own shapes (speed does not depend on the values)."""
    out = {}
    for i in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in i.shape]
        if "int" in i.type:
            out[i.name] = rng.integers(0, 10, size=shape).astype(np.int64)
        elif i.name == "timestep":
            out[i.name] = rng.uniform(0, 999, size=shape).astype(np.float32)
        else:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def timed(session, inputs: dict, repeats: int) -> tuple[float, np.ndarray]:
    result = session.run(None, inputs)[0]       # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    denoiser = PipelineSpec.load(args.out / SCHEDULER_DIR).denoiser
    onnx_dir = args.out / "onnx"
    graphs = {"fp32": (graph_path(onnx_dir, "fp32", "onnxruntime", denoiser), False),
              "w4a16 reference (INT4 DQ + MatMul)": (graph_path(onnx_dir, "w4a16", "onnxruntime", denoiser), True),
              "w4a16 CPU-fast (MatMulNBits)": (graph_path(onnx_dir, "w4a16", "cpu-fast", denoiser), False)}
    print(f"{args.out}: {denoiser}, {os.cpu_count()} CPU threads, median of {args.repeats} calls (measured)")
    print("| graph | file (MB) | " + " | ".join(f"batch {b} (ms)" for b in args.batches.split(","))
          + " | max abs diff to FP32 (largest batch) |\n|---|---|" + "---|" * len(args.batches.split(",")) + "---|")
    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    sessions = {name: create_session(path, float_kernels=ref) for name, (path, ref) in graphs.items()}
    times: dict[str, list[float]] = {name: [] for name in graphs}
    diffs: dict[str, float] = {}
    for batch in batches:
        inputs = feeds(sessions["fp32"], batch, rng)
        results = {}
        for name, session in sessions.items():
            ms, results[name] = timed(session, inputs, args.repeats)
            times[name].append(ms)
        if batch == max(batches):
            diffs = {name: float(np.abs(r - results["fp32"]).max()) for name, r in results.items()}
    for name, (path, _) in graphs.items():
        print(f"| {name} | {path.stat().st_size / 1e6:.2f} | " + " | ".join(f"{t:.2f}" for t in times[name])
              + f" | {'-' if name == 'fp32' else f'{diffs[name]:.2e}'} |")

if __name__ == "__main__":
    main()
