"""`ptqd sample`: images from the full-precision model or from an exported output."""
from __future__ import annotations

import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from ptqd.runtime.conditioning import runtime_conditioner
from ptqd.runtime.sampler import MinBatch, Sampler
from ptqd.errors import UserError
from ptqd.runtime.layout import (CALIBRATION_DIR, DENOISER_ROLE, ENGINES_DIR, ONNX_DIR, SCHEDULER_DIR, SPEC_FILE,
                                 TEXT_ENCODER_ROLE, VAE_DECODER_ROLE, deployment, graph_path)
from ptqd.output import atomic_write_bytes, check_output_file

DEFAULT_STEPS = 50
DEFAULT_BATCH = 64


@dataclass(frozen=True)
class SampleRequest:
    out: Path | None
    model: str | None
    num: int
    seed: int
    steps: int | None
    eta: float | None
    batch_size: int | None   # None: the engines' profile maximum, or DEFAULT_BATCH
    backend: str
    npy: Path | None
    grid: Path | None
    force: bool = False
    precision: str = "mixed"
    correction: bool = True
    graph: str = "fast"   # onnxruntime: the CPU-fast graph, or the exact twin of fake-quant
    conditions: tuple = ()  # conditional models: prompts or class labels (image j uses item j % len)
    cuda_graph: bool = False  # tensorrt: capture each engine's work per input shape, then replay it
    device: str = "auto"      # --backend torch: where torch runs (devices.resolve_device)
    negative_prompt: str | None = None   # text models: the unconditional prompt (None: the model's default)


def _torch_device(req: SampleRequest):
    """The torch device of --backend torch (other backends load the model on the CPU only for
    what runs around their engines)."""
    import torch

    from ptqd.devices import resolve_device

    return resolve_device(req.device) if req.backend == "torch" else torch.device("cpu")


def run_sample(req: SampleRequest) -> np.ndarray:
    if req.npy is None and req.grid is None:
        raise UserError("nothing to write: give --output x.npy and/or --grid x.png")
    if req.backend == "torch" and req.device.strip().lower() not in ("auto", "cpu"):
        _torch_device(req)   # a device torch cannot use: refused before anything is loaded
    if req.cuda_graph and req.backend != "tensorrt":
        raise UserError(f"--cuda-graph applies to --backend tensorrt, not {req.backend}")
    if req.negative_prompt is not None and any(isinstance(c, int) for c in req.conditions):
        raise UserError("--negative-prompt applies to text-conditioned models, not to --class")
    for target in (req.npy, req.grid):
        if target is not None:
            check_output_file(target, req.force)
    start = time.perf_counter()
    images = sample_full_precision(req) if req.out is None else sample_output(req)
    seconds = time.perf_counter() - start
    write_images(images, req.npy, req.grid)
    shape = "x".join(str(d) for d in images.shape[1:])
    written = " and ".join(str(p) for p in (req.npy, req.grid) if p is not None)
    what = req.backend if req.out is None else f"{req.backend}, {req.precision}" + (
        "" if req.correction else ", no correction")
    click.echo(f"{len(images)} samples ({shape}, {what}) in {seconds:.1f} s -> {written}")
    return images


def sample_full_precision(req: SampleRequest) -> np.ndarray:
    from ptqd.model import DEFAULT_MODEL
    from ptqd.model import load_model

    from ptqd.conditions import pipeline_spec, vae_decoder_fn

    steps = req.steps or DEFAULT_STEPS
    eta = req.eta or 0.0
    model = load_model(req.model or DEFAULT_MODEL, steps, _torch_device(req))
    spec = pipeline_spec(model, None, ())
    if not spec.conditional and req.conditions:
        raise UserError(f"model {model.source.spec!r} is unconditional: --prompt and --class do not apply")
    _check_negative_prompt(spec, req)
    if req.backend == "torch":
        from ptqd.calibration.trajectory import sample_torch_fp

        return sample_torch_fp(model.denoiser, model.scheduler_config, steps, eta, req.num, req.seed,
                               req.batch_size or DEFAULT_BATCH, conditioner=_torch_conditioner(model, spec, req),
                               decoder=vae_decoder_fn(model.vae))
    if spec.conditional or spec.latent:
        raise UserError("without OUT, a conditional or latent model samples with --backend torch; "
                        "export it (export-trt) to sample its onnxruntime graphs")
    if req.backend == "onnxruntime":
        from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
        from ptqd.exporter.onnx_fp import export_fp_onnx

        schedule = _schedule(model, steps, eta, ["fp32"] * steps, None)
        with tempfile.TemporaryDirectory(prefix="ptqd-sample-") as tmp:
            engine = OnnxRuntimeUNet(export_fp_onnx(model.denoiser, Path(tmp) / "denoiser_fp32.onnx"))
        return _generate(Sampler(schedule, {"fp32": engine}, req.batch_size or DEFAULT_BATCH), req)
    raise UserError("--backend tensorrt runs an exported output's engines: give OUT "
                    "(made by export-trt)")


def _schedule(model, steps, eta, configs, corrections):
    from ptqd.conditions import latent_shape
    from ptqd.ddim import build_schedule

    return build_schedule(model.scheduler_config, steps, eta, latent_shape(model.denoiser), configs, corrections)


def _check_negative_prompt(spec, req: SampleRequest) -> None:
    if req.negative_prompt is not None and spec.kind != "text":
        raise UserError(f"--negative-prompt applies to text-conditioned models; this one is {spec.kind}")


def _torch_conditioner(model, spec, req: SampleRequest):
    from ptqd.conditions import torch_conditioner

    try:
        return torch_conditioner(model, spec, spec.check_conditions(req.conditions), req.negative_prompt)
    except ValueError as exc:
        raise UserError(f"--prompt/--class: {exc}") from None


def _generate(sampler, req: SampleRequest) -> np.ndarray:
    from tqdm import tqdm

    with tqdm(total=req.num * len(sampler.schedule.steps), unit="img-step", disable=None,
              desc="sampling", leave=False) as bar:
        return sampler.generate(req.num, req.seed, on_progress=bar.update)


def sample_output(req: SampleRequest) -> np.ndarray:
    """Sample OUT's quantized model at --precision, with or without the PTQD correction."""
    if req.backend == "torch":
        return _generate(_sample_output_torch(req, *_output_plan(req)), req)
    return _generate(output_sampler(req), req)


def output_sampler(req: SampleRequest):
    """The engines.sampler.Sampler that samples OUT on its engines as `req` asks: what
    `ptqd sample OUT --backend onnxruntime|tensorrt` runs, for callers that drive the loop."""
    return _sample_output_engines(req, *_output_plan(req))


def _output_plan(req: SampleRequest):
    from ptqd.calibration.artifact import load_ptqd_json, steps_and_corrections

    if not req.out.is_dir():
        raise UserError(f"{req.out} is not an output directory (made by export-trt or ptqd calibrate)")
    if req.model is not None:
        raise UserError("--model cannot be combined with OUT: OUT records the model it was made from")
    doc = load_ptqd_json(req.out / CALIBRATION_DIR)
    steps, eta = doc["num_inference_steps"], doc["eta"]
    if (req.steps is not None and req.steps != steps) or (req.eta is not None and req.eta != eta):
        raise UserError(f"{req.out} was calibrated for --steps {steps} --eta {eta:g}; its PTQD "
                        "statistics are not valid for other values (recalibrate)")
    configs, corrections = steps_and_corrections(doc, req.precision, req.correction)
    return doc, configs, corrections


def _sample_output_torch(req, doc, configs, corrections):
    from ptqd.conditions import vae_decoder_fn
    from ptqd.exporter.stage import calibrated_spec
    from ptqd.model import load_model

    model = load_model(doc["model"], doc["num_inference_steps"], _torch_device(req))
    if model.source.sha256 != doc["model_sha256"]:
        raise UserError(f"model {doc['model']!r} has changed since {req.out} was calibrated "
                        "(sha256 differs); recalibrate")
    schedule = _schedule(model, doc["num_inference_steps"], doc["eta"], configs, corrections)
    engines = _torch_engines(model, req.out / CALIBRATION_DIR, set(configs))
    spec = calibrated_spec(model, doc)
    _check_negative_prompt(spec, req)
    return Sampler(schedule, engines, req.batch_size or DEFAULT_BATCH, _torch_conditioner(model, spec, req),
                   vae_decoder_fn(model.vae))


def _sample_output_engines(req, doc, configs, corrections):
    """The deployed path: the deployment's engines and the folded schedule file; neither torch
    nor diffusers is imported."""
    from ptqd.runtime.conditioning import guided_batch
    from ptqd.runtime.schedule import FoldedSchedule
    from ptqd.runtime.timeline import refold

    sched_dir = req.out / SCHEDULER_DIR
    if not sched_dir.is_dir():
        raise UserError(f"{req.out} has no {SCHEDULER_DIR}/: run `ptqd export {req.out}` first")
    schedule = FoldedSchedule.load(sched_dir)
    if req.precision != "mixed" or not req.correction:
        # an ablation, not the deployed table: the same DDIM steps folded afresh
        schedule = refold(schedule, configs, corrections)
    spec = _pipeline_spec(sched_dir)
    _check_negative_prompt(spec, req)
    batch_size = _engine_batch_size(req, 2 if spec.guided else 1)
    plans = _tensorrt_engine_set(req) if req.backend == "tensorrt" else None
    graphs = deployment(spec, schedule.sample_shape, sorted(set(configs)))
    engines = {g.config: _engine(req.out, g, req.backend, req.graph, spec.denoiser, plans)
               for g in graphs if g.role == DENOISER_ROLE}
    encoders = {g.name: _extra_engine(req.out, g, req.backend, plans) for g in graphs if g.role == TEXT_ENCODER_ROLE}
    conditioner = _runtime_conditioner(spec, req, sched_dir, encoders)
    decoder = next((_extra_engine(req.out, g, req.backend, plans) for g in graphs if g.role == VAE_DECODER_ROLE),
                   None)
    return Sampler(schedule, engines, batch_size if req.batch_size else guided_batch(batch_size, spec),
                   conditioner, decoder)


def _engine_batch_size(req: SampleRequest, per_image: int = 1) -> int:
    """Engines are built for a batch range (--batch at build time): by default sample in
    batches of its maximum; refuse an explicit --batch-size they cannot run (a guided model's
    UNet call takes per_image = 2 samples per image)."""
    from ptqd.engines.profiles import recorded_profile

    profile = recorded_profile(req.out / ENGINES_DIR)
    if profile is None:
        return req.batch_size or DEFAULT_BATCH
    lo, hi = profile.min, profile.max
    if req.batch_size is None:
        if hi < per_image:
            raise UserError(f"the engines' profile {lo}..{hi} cannot take one guided image ({per_image} "
                            f"samples per denoiser call); rebuild with `ptqd build {req.out} --batch ... --force`")
        return hi
    unet_batch = min(req.batch_size, req.num) * per_image
    if not lo <= unet_batch <= hi:
        raise UserError(f"denoiser batch {unet_batch} is outside the engines' profile {lo}..{hi}; "
                        f"use --batch-size within it or rebuild with `ptqd build {req.out} --batch ... --force`")
    return req.batch_size


def _pipeline_spec(sched_dir: Path):
    from ptqd.runtime.conditioning import PipelineSpec

    try:
        return PipelineSpec.load(sched_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{sched_dir / SPEC_FILE} does not read ({type(exc).__name__}); was it edited? "
                        "`ptqd verify` checks the output") from None


def _runtime_conditioner(spec, req: SampleRequest, sched_dir: Path, encoders: dict):
    try:
        spec.check_conditions(req.conditions)
    except ValueError as exc:
        raise UserError(f"--prompt/--class: {exc}") from None
    try:
        return runtime_conditioner(spec, req.conditions, sched_dir, encoders, req.negative_prompt)
    except Exception as exc:  # a missing or damaged tokenizer: OSError, tokenizers' own exceptions
        folders = ", ".join(str(sched_dir / e["tokenizer"]) for e in spec.text_encoders)
        raise UserError(f"{folders} does not load ({type(exc).__name__}); "
                        "`ptqd verify` checks the output, `ptqd export --force` rewrites it") from None


def _tensorrt_engine_set(req: SampleRequest):
    """The plans' owner: one stream and one activation buffer for the denoisers, the decoder
    and the text encoders, which the sampler runs one after another."""
    from ptqd.engines.tensorrt import EngineSet

    return EngineSet(cuda_graph=req.cuda_graph)


def _plan(out: Path, graph, plans, kind=None):
    plan = out / ENGINES_DIR / graph.plan_name
    if not plan.is_file():
        raise UserError(f"{plan} is missing: build it with `ptqd build {out} --backend tensorrt` "
                        f"or {out / ENGINES_DIR / 'build_engines.sh'}")
    engine = plans.load(plan, kind)
    return MinBatch(engine, engine.batch_range[0])  # a last, smaller chunk is padded


def _graph(path: Path, float_kernels: bool = False, denoiser: bool = False):
    from ptqd.runtime.onnxruntime import OnnxRuntimeGraph, OnnxRuntimeUNet

    if not path.is_file():
        out = path.parent.parent
        raise UserError(f"{path} is missing: run `ptqd export {out}` (with --force to redo it)")
    return (OnnxRuntimeUNet if denoiser else OnnxRuntimeGraph)(path, float_kernels=float_kernels)


def _extra_engine(out: Path, graph, backend: str, plans=None):
    """The VAE decoder or a text encoder: its plan with --backend tensorrt (loaded into the
    sampler's EngineSet `plans`), else its FP32 graph."""
    return _plan(out, graph, plans) if backend == "tensorrt" else _graph(out / ONNX_DIR / graph.cpu_graph)


def _engine(out: Path, graph, backend: str, flavour: str, denoiser: str, plans=None):
    """onnxruntime: the CPU-fast graph (fused integer kernels, 8-bit output rounding on top)
    or the reference graph (the fake-quant model's exact twin); tensorrt: the built plan,
    loaded into the sampler's EngineSet `plans`."""
    if backend == "tensorrt":
        from ptqd.engines.tensorrt import TensorRTUNet

        return _plan(out, graph, plans, TensorRTUNet)
    if flavour == "fast":
        return _graph(out / ONNX_DIR / graph.cpu_graph, denoiser=True)
    # the reference is fake-quant's twin only with float kernels (runtime.onnxruntime.session_options)
    return _graph(graph_path(out / ONNX_DIR, graph.config, "onnxruntime", denoiser), True, denoiser=True)


def _torch_engines(model, calibration_dir: Path, configs: set[str]) -> dict:
    from ptqd.calibration.configs import FLOAT_CONFIG
    from ptqd.calibration.fakequant import fake_quant_unet
    from ptqd.calibration.trajectory import TorchUNetEngine
    from ptqd.calibration.params import load_params

    params = load_params(calibration_dir)
    engines = {}
    for cfg in configs:
        denoiser = model.denoiser if cfg == FLOAT_CONFIG else fake_quant_unet(model.denoiser, params[cfg])
        engines[cfg] = TorchUNetEngine(denoiser)
    return engines


def write_images(images: np.ndarray, npy: Path | None, grid: Path | None) -> None:
    if npy is not None:
        buf = io.BytesIO()
        np.save(buf, images.astype(np.float32))
        atomic_write_bytes(npy, buf.getvalue())
    if grid is not None:
        from ptqd.images import png_bytes

        atomic_write_bytes(grid, png_bytes(images))
