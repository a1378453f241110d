"""The deploy stage: OUT/scheduler + OUT/engines (+ OUT/onnx) -> OUT/triton, a Triton model
repository that `tritonserver --model-repository OUT/triton` serves with no edits.

    triton/
      ptqd_sampler/            Python backend: the denoising loop with the folded PTQD schedule
        config.pbtxt
        1/model.py, 1/ptqd_schedule.json, 1/ptqd/...   (ptqd's numpy-only runtime, copied)
        1/onnx/unet_<cfg>.cpu.onnx                      (--unets in-process only)
      unet_<cfg>/              one per configuration the schedule uses (--unets tensorrt|onnxruntime)
        config.pbtxt, 1/model.plan (TensorRT) or 1/model.py + 1/model.onnx (onnxruntime)

The repository carries everything it runs, so it can be copied into the Triton image alone.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import click

from ptqd.engines.profiles import BatchProfile, recorded_profile
from ptqd.errors import UserError
from ptqd.exporter.graph_files import graph_path
from ptqd.exporter.schedule import SCHEDULE_FILE, FoldedSchedule
from ptqd.output import link_or_copy
from ptqd.deploy import model_config

SAMPLER = "ptqd_sampler"
UNET_MODES = ("auto", "tensorrt", "onnxruntime", "in-process")
DEFAULT_MAX_IMAGES = 256
# Two sampler instances: a second request is served while the first runs, and in TensorRT
# mode their UNet calls meet in the dynamic batcher. Measured on 2 CPU cores, 32 concurrent
# 2-image requests: 6.4-7.3 s with one instance, 2.2-2.5 s with two (two runs of benchmarks/triton_serving.py).
DEFAULT_INSTANCES = 2
# What the Python-backend models import from ptqd: numpy-only modules (no torch, no click).
RUNTIME_MODULES = ("__init__.py", "errors.py", "engines/__init__.py", "engines/noise.py",
                   "engines/sampler.py", "engines/onnxruntime.py", "exporter/__init__.py",
                   "exporter/schedule.py", "exporter/graph_files.py")


def unet_model_name(cfg: str) -> str:
    return f"unet_{cfg}"


def _copy(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise UserError(f"{src} is missing: run `ptqd export` / `ptqd build` on the output again "
                        "(`ptqd verify` lists what else is wrong)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    link_or_copy(src, dst)


def _copy_runtime(version_dir: Path, model_file: str) -> None:
    package = resources.files("ptqd")
    for rel in RUNTIME_MODULES:
        target = version_dir / "ptqd" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(package.joinpath(rel).read_bytes())
    source = package.joinpath("deploy", "triton_models", model_file)
    (version_dir / "model.py").write_bytes(source.read_bytes())


def engine_profile(out: Path) -> BatchProfile:
    """The batch range the engines were built for; the repository's UNets batch within it."""
    profile = recorded_profile(out / "engines")
    if profile is None:
        raise UserError(f"{out} has no engines/: run `ptqd build {out}` first")
    return profile


def _plans(out: Path, configs: list[str]) -> dict[str, Path]:
    plans = {cfg: out / "engines" / f"unet_{cfg}.plan" for cfg in configs}
    return {cfg: p for cfg, p in plans.items() if p.is_file()}


def resolve_unets(out: Path, configs: list[str], unets: str) -> str:
    if unets not in UNET_MODES:
        raise UserError(f"--unets {unets!r}: expected one of {', '.join(UNET_MODES)}")
    plans = _plans(out, configs)
    if unets == "auto":
        return "tensorrt" if len(plans) == len(configs) else "in-process"
    if unets == "tensorrt" and len(plans) != len(configs):
        missing = ", ".join(f"unet_{c}.plan" for c in configs if c not in plans)
        raise UserError(f"--unets tensorrt: {out}/engines has no {missing}; build the engines "
                        "(engines/build_engines.sh in NVIDIA's TensorRT container) or use --unets in-process")
    return unets


def _cpu_threads(instances: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // instances)


def write_repository(out: Path, dest: Path, unets: str = "auto", instances: int = DEFAULT_INSTANCES,
                     max_images: int = DEFAULT_MAX_IMAGES) -> str:
    """Fill dest (an empty or new folder) with the repository; returns the UNet mode used."""
    if instances < 1:
        raise UserError(f"--instances {instances}: must be at least 1")
    if not (out / "scheduler").is_dir():
        raise UserError(f"{out} has no scheduler/: run `ptqd export {out}` first")
    schedule = FoldedSchedule.load(out / "scheduler")
    configs = schedule.configs
    profile = engine_profile(out)
    mode = resolve_unets(out, configs, unets)
    threads = _cpu_threads(instances)

    version = dest / SAMPLER / "1"
    _copy_runtime(version, "sampler.py")
    _copy(out / "scheduler" / SCHEDULE_FILE, version / SCHEDULE_FILE)
    if mode == "in-process":
        for cfg in configs:
            graph = graph_path(out / "onnx", cfg, "cpu-fast")
            _copy(graph, version / "onnx" / graph.name)
    params = {"unets": "in-process" if mode == "in-process" else "bls", "batch": profile.max, "min_batch": profile.min,
              "max_images": max_images, "threads": threads}
    model_config.write_config(dest / SAMPLER, model_config.sampler(SAMPLER, schedule.sample_shape,
                                                                   instances, params))
    for cfg in configs if mode != "in-process" else []:
        name = unet_model_name(cfg)
        if mode == "tensorrt":
            _copy(out / "engines" / f"unet_{cfg}.plan", dest / name / "1" / "model.plan")
            config = model_config.unet_tensorrt(name, schedule.sample_shape, profile)
        else:
            _copy_runtime(dest / name / "1", "unet_onnxruntime.py")
            _copy(graph_path(out / "onnx", cfg, "cpu-fast"), dest / name / "1" / "model.onnx")
            config = model_config.unet_onnxruntime(name, schedule.sample_shape, profile, threads)
        model_config.write_config(dest / name, config)
    models = [SAMPLER] + ([unet_model_name(c) for c in configs] if mode != "in-process" else [])
    click.echo(f"[triton] models {', '.join(models)} (UNets: {mode}, batch up to {profile.max})")
    return mode
