"""The Triton repository on the CPU Triton server: start time and one request's latency over
HTTP and gRPC, for each way the sampler can run the UNets (load: benchmarks/triton_load.py).

    .venv/bin/python benchmarks/triton_serving.py OUT [--num 16] [--repeats 5]

OUT is an export-trt output (e.g. ptqd-out from `make demo`). The repository is redeployed
into a scratch copy per mode (in-process; onnxruntime UNet models called through BLS), served
by nvidia-pytriton's tritonserver from `make triton-env`, and every answer is checked against
the local sampler (same schedule file, same graphs) before its time is counted.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ptqd.deploy.client import request_images
from ptqd.deploy.repository import write_repository
from ptqd.deploy.server import LocalTritonServer
from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
from ptqd.runtime.sampler import generate
from ptqd.runtime.layout import graph_path
from ptqd.runtime.schedule import FoldedSchedule


def local_sampler(out: Path, batch: int):
    schedule = FoldedSchedule.load(out / "scheduler")
    engines = {c: OnnxRuntimeUNet(graph_path(out / "onnx", c, "cpu-fast")) for c in schedule.configs}
    return lambda num, seed: generate(schedule, engines, num, seed, batch), len(schedule.steps)


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def bench_mode(out: Path, mode: str, instances: int, args, reference) -> dict:
    with tempfile.TemporaryDirectory(prefix="ptqd-serve-bench-") as tmp:
        repo = Path(tmp) / "triton"
        write_repository(out, repo, mode, instances)
        with LocalTritonServer(repo, log_path=Path(tmp) / "tritonserver.log") as server:
            row = {"mode": mode, "instances": instances, "start_s": server.start_seconds}
            for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
                request_images(url, args.num, 0, protocol=protocol)  # warm-up
                times = []
                for r in range(args.repeats):
                    images, seconds = timed(lambda: request_images(url, args.num, r, protocol=protocol))
                    assert np.array_equal(images, reference(args.num, r)), f"{mode}/{protocol}: wrong images"
                    times.append(seconds)
                row[f"{protocol}_s"] = statistics.median(times)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from ptqd.deploy.repository import engine_profile

    batch = engine_profile(args.out).max
    reference, steps = local_sampler(args.out, batch)
    _, local_s = timed(lambda: reference(args.num, 0))
    print(f"{args.out}: {steps} steps, batch {batch}; local sampler, {args.num} images: {local_s:.3f} s")
    print(f"{'UNets':<12}{'inst':>5}{'start s':>9}{'http s':>9}{'grpc s':>9}")
    for mode, instances in (("in-process", 1), ("in-process", 2), ("onnxruntime", 2), ("onnxruntime", 4)):
        row = bench_mode(args.out, mode, instances, args, reference)
        print(f"{row['mode']:<12}{row['instances']:>5}{row['start_s']:>9.2f}{row['http_s']:>9.3f}"
              f"{row['grpc_s']:>9.3f}")


if __name__ == "__main__":
    main()
