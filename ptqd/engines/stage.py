"""The engines stage: OUT/onnx + OUT/scheduler -> OUT/engines.

- tensorrt: one .plan per configuration in the schedule, with metadata and a shared timing
  cache (needs TensorRT; an explicit request without it is a one-line error).
- onnxruntime: the CPU-fast graph of each configuration, checked to load, described in
  engines/onnxruntime.json with the session options the sampler uses.
- auto: tensorrt where TensorRT is installed, else onnxruntime, saying so.
Without TensorRT, engines/build_engines.sh holds the commands that build the same engines in
NVIDIA's TensorRT container.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from ptqd.engines.build_script import write_build_script
from ptqd.engines.jobs import engine_jobs
from ptqd.runtime.onnxruntime import create_session
from ptqd.engines.tensorrt import BuildSettings, EngineBuilder, import_tensorrt, tensorrt_available
from ptqd.errors import UserError
from ptqd.runtime.layout import DENOISER_ROLE, ORT_MANIFEST

BACKENDS = ("auto", "tensorrt", "onnxruntime")


def build_tensorrt(out: Path, engines_dir: Path, settings: BuildSettings) -> list[Path]:
    builder = EngineBuilder(settings, engines_dir / "timing.cache", import_tensorrt())
    plans = []
    for job in engine_jobs(out, settings.profile):
        plan = engines_dir / job.plan_name
        meta = builder.build(job.onnx, plan, job.config, job.shapes)
        click.echo(f"[engines] {plan.name}: TensorRT {meta['tensorrt_version']}, "
                   f"{meta['gpu']['name']} (sm {meta['gpu']['compute_capability']})")
        plans.append(plan)
    return plans


def build_onnxruntime(out: Path, engines_dir: Path, settings: BuildSettings) -> Path:
    entries = {}
    for job in engine_jobs(out, settings.profile):
        graph = job.cpu_onnx
        session = create_session(graph)  # fails here, not at sampling time, if it cannot load
        key = job.config if job.role == DENOISER_ROLE else job.name
        entries[key] = {"graph": f"onnx/{graph.name}", "providers": session.get_providers()}
    doc = {"format_version": 1, "batch_profile": str(settings.profile), "engines": entries,
           "session": {"graph_optimization_level": "ORT_ENABLE_ALL", "execution_mode": "sequential",
                       "intra_op_threads": "all cores", "disabled_optimizers": ["QDQPropagationTransformer"]}}
    path = engines_dir / ORT_MANIFEST
    path.write_text(json.dumps(doc, indent=1) + "\n")
    listing = ", ".join(f"{c} ({e['graph']})" for c, e in entries.items())
    click.echo(f"[engines] onnxruntime: {listing}")
    return path


def build_engines(out: Path, engines_dir: Path, backend: str, settings: BuildSettings) -> str:
    """Fill engines_dir; returns the backend whose engines were built."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if not (out / "scheduler").is_dir() or not (out / "onnx").is_dir():
        raise UserError(f"{out} has no onnx/ and scheduler/: run `ptqd export {out}` first")
    engines_dir.mkdir(parents=True, exist_ok=True)
    use_trt = backend == "tensorrt" or (backend == "auto" and tensorrt_available())
    if backend == "tensorrt":
        import_tensorrt()  # one-line UserError before anything is written
    if not use_trt or backend == "auto":
        build_onnxruntime(out, engines_dir, settings)
    script = write_build_script(engines_dir, engine_jobs(out, settings.profile), settings)
    if use_trt:
        build_tensorrt(out, engines_dir, settings)
        return "tensorrt"
    click.echo(f"[engines] TensorRT engines NOT built: TensorRT is not installed here. "
               f"{script.relative_to(engines_dir.parent)} builds them in NVIDIA's TensorRT container.")
    return "onnxruntime"
