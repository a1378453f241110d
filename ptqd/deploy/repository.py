"""The deploy stage: OUT/scheduler + OUT/engines (+ OUT/onnx) -> OUT/triton, a Triton model
repository that `tritonserver --model-repository OUT/triton` serves with no edits.

    triton/
      ptqd_sampler/            Python backend: encode the prompt or class, the denoising loop with
        config.pbtxt           the folded PTQD schedule and guidance, decode
        1/model.py, 1/ptqd_schedule.json, 1/ptqd/runtime/...   (ptqd's numpy-only runtime, copied)
        1/pipeline.json, 1/tokenizer/ (1/tokenizer_2/)    (conditional / latent models)
        1/onnx/<denoiser>_<cfg>.cpu.onnx, vae_decoder.onnx, text_encoder*.onnx   (--unets in-process only)
      unet_<cfg>/              one per configuration the schedule uses (--unets tensorrt|onnxruntime);
                               transformer_<cfg>/ for a diffusion transformer
        config.pbtxt, 1/model.plan (TensorRT) or 1/model.py + 1/model.onnx (onnxruntime)
      vae_decoder/, text_encoder/ (text_encoder_2/)   the same, for latent / text models

The models are the deployment's graphs (runtime.layout.deployment), listed there once.

The repository carries everything it runs, so it can be copied into the Triton image alone.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import click

from ptqd.engines.build_script import embedding_sizes
from ptqd.engines.profiles import BatchProfile, recorded_profile
from ptqd.errors import UserError
from ptqd.runtime.conditioning import PipelineSpec
from ptqd.runtime.layout import SCHEDULE_FILE, SPEC_FILE, deployment, graph_files
from ptqd.runtime.schedule import FoldedSchedule
from ptqd.output import link_or_copy
from ptqd.deploy import model_config

SAMPLER = "ptqd_sampler"
UNET_MODES = ("auto", "tensorrt", "onnxruntime", "in-process")
DEFAULT_MAX_IMAGES = 256
# Two sampler instances: a second request is served while the first runs, and in TensorRT
# mode their UNet calls meet in the dynamic batcher. Measured on 2 CPU cores, 32 concurrent
# 2-image requests: 6.4-7.3 s with one instance, 2.2-2.5 s with two (two runs of benchmarks/triton_serving.py).
DEFAULT_INSTANCES = 2
# What a Python-backend model imports of ptqd: the numpy-only runtime package, whole, and the
# error type it raises; the package's __init__ makes `ptqd` importable (it imports nothing).
RUNTIME_FILES = ("__init__.py", "errors.py")
RUNTIME_PACKAGE = "runtime"
GRAPH_MODEL = "graph_onnxruntime.py"   # the Python-backend model that runs one graph


def _copy(src: Path, dst: Path) -> None:
    """src to dst; a graph's external-data file goes beside dst under its own name, the name
    recorded inside the graph (layout.external_data_path)."""
    if not src.is_file():
        raise UserError(f"{src} is missing: run `ptqd export` / `ptqd build` on the output again "
                        "(`ptqd verify` lists what else is wrong)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    link_or_copy(src, dst)
    for companion in graph_files(src)[1:]:
        link_or_copy(companion, dst.parent / companion.name)


def _copy_runtime(version_dir: Path, model_file: str) -> None:
    package = resources.files("ptqd")
    runtime = package.joinpath(RUNTIME_PACKAGE)
    sources = [(name, package.joinpath(name)) for name in RUNTIME_FILES]
    sources += [(f"{RUNTIME_PACKAGE}/{f.name}", f) for f in runtime.iterdir() if f.name.endswith(".py")]
    for rel, source in sources:
        target = version_dir / "ptqd" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    source = package.joinpath("deploy", "triton_models", model_file)
    (version_dir / "model.py").write_bytes(source.read_bytes())


def engine_profile(out: Path) -> BatchProfile:
    """The batch range the engines were built for; the repository's UNets batch within it."""
    profile = recorded_profile(out / "engines")
    if profile is None:
        raise UserError(f"{out} has no engines/: run `ptqd build {out}` first")
    return profile


def graph_models(out: Path, schedule: FoldedSchedule, spec: PipelineSpec) -> dict[str, tuple]:
    """Every model of the deployment that runs a graph, by Triton model name: (its plan, the
    graph ONNX Runtime runs without TensorRT, (inputs, outputs))."""
    return {g.name: (out / "engines" / g.plan_name, out / "onnx" / g.cpu_graph, g.io)
            for g in deployment(spec, schedule.sample_shape, schedule.configs)}


def copy_spec_files(scheduler_dir: Path, version: Path, spec: PipelineSpec) -> list[tuple[Path, Path]]:
    """(original, copy) of what the sampler model reads beside its schedule: pipeline.json
    and each text encoder's tokenizer folder."""
    pairs = [(scheduler_dir / SPEC_FILE, version / SPEC_FILE)] if (scheduler_dir / SPEC_FILE).is_file() else []
    for encoder in spec.text_encoders:
        pairs += [(f, version / encoder["tokenizer"] / f.name)
                  for f in sorted((scheduler_dir / encoder["tokenizer"]).glob("*"))]
    return pairs


def resolve_unets(out: Path, models: dict[str, tuple], unets: str) -> str:
    if unets not in UNET_MODES:
        raise UserError(f"--unets {unets!r}: expected one of {', '.join(UNET_MODES)}")
    missing = ", ".join(plan.name for plan, _, _ in models.values() if not plan.is_file())
    if unets == "auto":
        return "in-process" if missing else "tensorrt"
    if unets == "tensorrt" and missing:
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
    spec = PipelineSpec.load(out / "scheduler")
    profile = engine_profile(out)
    if spec.guided and profile.max < 2:
        raise UserError(f"{out}: the engines' batch profile {profile} cannot take one guided image (2 denoiser "
                        f"samples); rebuild with `ptqd build {out} --batch 1,2,4 --force` (or larger)")
    models = graph_models(out, schedule, spec)
    mode = resolve_unets(out, models, unets)
    threads = _cpu_threads(instances)

    version = dest / SAMPLER / "1"
    _copy_runtime(version, "sampler.py")
    _copy(out / "scheduler" / SCHEDULE_FILE, version / SCHEDULE_FILE)
    for original, copy in copy_spec_files(out / "scheduler", version, spec):
        _copy(original, copy)
    if mode == "in-process":
        for _, graph, _ in models.values():
            _copy(graph, version / "onnx" / graph.name)
    params = {"unets": "in-process" if mode == "in-process" else "bls", "batch": profile.max, "min_batch": profile.min,
              "max_images": max_images, "threads": threads}
    model_config.write_config(dest / SAMPLER, model_config.sampler(
        SAMPLER, spec.image_shape or schedule.sample_shape, instances, params, spec.kind))
    for name, (plan, graph, io) in models.items() if mode != "in-process" else []:
        if mode == "tensorrt":
            _copy(plan, dest / name / "1" / "model.plan")
            config = model_config.tensorrt_model(name, io, profile)
        else:
            _copy_runtime(dest / name / "1", GRAPH_MODEL)
            _copy(graph, dest / name / "1" / "model.onnx")
            config = model_config.onnxruntime_model(name, io, profile, threads, embedding_sizes(graph))
        model_config.write_config(dest / name, config)
    names = [SAMPLER] + (list(models) if mode != "in-process" else [])
    click.echo(f"[triton] models {', '.join(names)} (denoisers: {mode}, batch up to {profile.max})")
    return mode
