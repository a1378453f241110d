"""Load on the CPU Triton server: a fixed number of requests at bounded concurrency (1, 4, 16,
64 clients by default), every answer checked against local sampling, and Triton's own queue
and compute time read from its metrics endpoint.

    .venv/bin/python benchmarks/triton_load.py OUT [--requests 64] [--num 2]
        [--concurrency 1,4,16,64] [--layouts in-process:2,onnxruntime:2,onnxruntime:4]

OUT is an export-trt output (e.g. ptqd-out from `make demo`). Per layout (how the sampler runs
the denoisers : sampler instances) the repository is redeployed into a scratch copy and served
by nvidia-pytriton's tritonserver (`make triton-env`) with ptqd serve's arguments. Each level
sends --requests requests of --num images (seed = request number) from an asyncio gRPC client
holding at most `concurrency` in flight, and stops when all are answered. Reported per level:
throughput, p50/p99 latency as the client sees it, and from the :8002 counters over the level:
the sampler's mean queue and compute time per request and their ratio, the mean number of
requests waiting for a sampler instance (the gauge sampled every 0.5 s): the Kubernetes
autoscaler's two metrics (ptqd/deploy/kubernetes.py); and from the statistics API each
denoiser model's mean batch and the share of the level's wall time it spent computing.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_serving import local_sampler  # noqa: E402

from ptqd.deploy.model_config import SAMPLER_OUTPUT  # noqa: E402
from ptqd.deploy.repository import SAMPLER, engine_profile, write_repository  # noqa: E402
from ptqd.deploy.server import LocalTritonServer  # noqa: E402

COUNTERS = ("nv_inference_request_success", "nv_inference_queue_duration_us",
            "nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count")
LINE = re.compile(r'^(\w+)\{model="([^"]+)",version="[^"]*"\} ([0-9.e+]+)$')


def scrape(url: str) -> dict:
    """{(counter, model): value} from Triton's Prometheus text."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = LINE.match(line)
        if match and match.group(1) in COUNTERS:
            values[(match.group(1), match.group(2))] = float(match.group(3))
    return values


def wait_for_metrics(url: str, requests: int) -> dict:
    """Triton refreshes its counters every 2 s: wait until the sampler's count shows them all."""
    deadline = time.monotonic() + 15
    while True:
        values = scrape(url)
        if values.get(("nv_inference_request_success", SAMPLER), 0) >= requests or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


async def drive(url: str, concurrency: int, requests: int, num: int, first_seed: int) -> tuple[list, list]:
    import tritonclient.grpc.aio as grpc

    client = grpc.InferenceServerClient(url)
    gate = asyncio.Semaphore(concurrency)
    latencies, images = [0.0] * requests, [None] * requests

    async def one(i: int) -> None:
        inputs = []
        for name, value, dtype in (("seed", np.array([first_seed + i], np.int64), "INT64"),
                                   ("num_images", np.array([num], np.int32), "INT32")):
            tensor = grpc.InferInput(name, [1], dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        async with gate:
            started = time.perf_counter()
            result = await client.infer(SAMPLER, inputs, outputs=[grpc.InferRequestedOutput(SAMPLER_OUTPUT)],
                                        client_timeout=600)
            latencies[i] = time.perf_counter() - started
        images[i] = result.as_numpy(SAMPLER_OUTPUT)

    try:
        await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        await client.close()
    return latencies, images


def model_stats(url: str) -> dict:
    """{model: (inferences, executions, seconds computing)} from Triton's statistics API: the
    compute time per execution (batch_stats), not per request as the metrics count it."""
    import tritonclient.http as http

    client = http.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics()["model_stats"]
    finally:
        client.close()
    return {m["name"]: (m["inference_count"], m["execution_count"],
                        sum(b["compute_infer"]["ns"] for b in m.get("batch_stats", [])) / 1e9) for m in stats}


def level(server: LocalTritonServer, concurrency: int, args, first_seed: int) -> dict:
    before = wait_for_metrics(server.metrics_url, 0)
    stats_before = model_stats(server.http_url)
    # the waiting-requests gauge (the HPA's second metric), sampled while the level runs
    waiting, stop = [], threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            waiting.append(scrape(server.metrics_url).get(("nv_inference_pending_request_count", SAMPLER), 0.0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    latencies, images = asyncio.run(drive(server.grpc_url, concurrency, args.requests, args.num, first_seed))
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    stats = {m: tuple(a - b for a, b in zip(v, stats_before.get(m, (0, 0, 0.0))))
             for m, v in model_stats(server.http_url).items()}
    done = before.get(("nv_inference_request_success", SAMPLER), 0) + args.requests
    after = wait_for_metrics(server.metrics_url, done)
    delta = defaultdict(float, {k: after[k] - before.get(k, 0.0) for k in after})
    served = delta[("nv_inference_request_success", SAMPLER)]
    queue_ms = delta[("nv_inference_queue_duration_us", SAMPLER)] / max(served, 1) / 1e3
    compute_ms = delta[("nv_inference_compute_infer_duration_us", SAMPLER)] / max(served, 1) / 1e3
    # per denoiser model: mean batch per execution, and the share of the level it was computing
    batches = {model: (inferences / executions, seconds / wall)
               for model, (inferences, executions, seconds) in stats.items() if model != SAMPLER and executions}
    return {"concurrency": concurrency, "requests": args.requests, "wall_s": wall,
            "throughput": args.requests * args.num / wall, "p50_s": float(np.percentile(latencies, 50)),
            "p99_s": float(np.percentile(latencies, 99)), "queue_ms": queue_ms, "compute_ms": compute_ms,
            "ratio": queue_ms / max(compute_ms, 1e-9), "waiting": float(np.mean(waiting)) if waiting else 0.0,
            "batches": batches, "images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--num", type=int, default=2, help="images per request")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--layouts", default="in-process:2,onnxruntime:2,onnxruntime:4",
                        help="UNETS:INSTANCES per served repository")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    layouts = [(mode, int(n)) for mode, n in (item.split(":") for item in args.layouts.split(","))]

    reference, steps = local_sampler(args.out, engine_profile(args.out).max)
    started = time.perf_counter()
    references = [reference(args.num, seed) for seed in range(args.requests)]
    local_s = (time.perf_counter() - started) / args.requests
    print(f"{args.out}: {steps} steps; local sampler (one process, all cores): "
          f"{local_s * 1e3:.0f} ms per request of {args.num} images, {args.num / local_s:.1f} images/s")
    print(f"{'layout':<16}{'clients':>8}{'img/s':>8}{'p50 s':>8}{'p99 s':>8}{'queue ms':>10}"
          f"{'compute ms':>12}{'q/c':>6}{'waiting':>8}  denoiser models: mean batch, busy")
    for mode, instances in layouts:
        with tempfile.TemporaryDirectory(prefix="ptqd-load-") as tmp:
            repo = Path(tmp) / "triton"
            write_repository(args.out, repo, mode, instances)
            with LocalTritonServer(repo, log_path=Path(tmp) / "tritonserver.log") as server:
                level(server, 1, argparse.Namespace(requests=2, num=args.num), 10**6)   # warm-up
                for concurrency in levels:
                    row = level(server, concurrency, args, 0)
                    wrong = sum(not np.array_equal(a, r) for a, r in zip(row["images"], references))
                    assert wrong == 0, f"{mode}:{instances} at {concurrency} clients: {wrong} wrong answers"
                    batches = ", ".join(f"{m} {b:.2f}, {busy:.0%}"
                                        for m, (b, busy) in sorted(row["batches"].items())) or "-"
                    print(f"{f'{mode}:{instances}':<16}{concurrency:>8}{row['throughput']:>8.1f}{row['p50_s']:>8.2f}"
                          f"{row['p99_s']:>8.2f}{row['queue_ms']:>10.0f}{row['compute_ms']:>12.0f}"
                          f"{row['ratio']:>6.2f}{row['waiting']:>8.1f}  {batches}", flush=True)


if __name__ == "__main__":
    main()
