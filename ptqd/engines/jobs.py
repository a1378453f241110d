"""What the engines stage builds: the deployment's graphs (runtime.layout.deployment): one
engine per configuration of the schedule's denoiser and, for latent and text-conditioned
models, the VAE decoder and text encoders (from their FP16 copies; a T5 encoder in FP32). The
TensorRT builder, the generated build script and the ONNX Runtime engines all work from this
list."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqd.engines.profiles import BatchProfile, batched_shapes
from ptqd.runtime.conditioning import PipelineSpec
from ptqd.runtime.layout import DENOISER_ROLE, TEXT_ENCODER_ROLE, DeployedGraph, deployment, graph_path
from ptqd.runtime.schedule import FoldedSchedule


@dataclass(frozen=True)
class EngineJob:
    name: str          # the plan's stem: unet_w4a8, transformer_fp8, vae_decoder, text_encoder_2
    config: str        # the bit configuration; fp16 / fp32 for the decoder / text encoders
    onnx: Path         # the graph TensorRT builds
    cpu_onnx: Path     # the graph ONNX Runtime runs instead (CPU-fast denoiser, FP32 decoder/encoders)
    shapes: dict       # per input: (min, opt, max)
    note: str
    role: str = DENOISER_ROLE
    # what the plan is checked against: a denoiser's ONNX Runtime reference graph (the
    # fake-quant model's exact twin, FP32), the decoder's and text encoders' FP32 graphs
    reference_onnx: Path | None = None

    @property
    def plan_name(self) -> str:
        return f"{self.name}.plan"


def _note(graph: DeployedGraph, schedule: FoldedSchedule, spec: PipelineSpec) -> str:
    if graph.role == DENOISER_ROLE:
        steps = sum(1 for s in schedule.steps if s.config == graph.config)
        return f"{graph.config}: runs {steps} of the schedule's steps" + (
            " (guided: 2 denoiser samples per image)" if spec.guided else "")
    if graph.role == TEXT_ENCODER_ROLE:
        return f"the text encoder {graph.name}, {graph.config.upper()}: once per chunk of prompts"
    return "the VAE decoder, FP16: once per image after the last step"


def engine_jobs(out: Path, profile: BatchProfile) -> list[EngineJob]:
    schedule = FoldedSchedule.load(out / "scheduler")
    spec = PipelineSpec.load(out / "scheduler")
    # the decoder and text encoders see one row per image (the text encoders two per guided
    # image, in two calls of one chunk each), never more than the denoiser's batch
    onnx = out / "onnx"
    return [EngineJob(g.name, g.config, onnx / g.tensorrt_graph, onnx / g.cpu_graph,
                      batched_shapes({name: dims for name, _, dims in g.io[0]}, profile),
                      _note(g, schedule, spec), g.role,
                      graph_path(onnx, g.config, "onnxruntime", spec.denoiser) if g.role == DENOISER_ROLE
                      else onnx / g.cpu_graph)
            for g in deployment(spec, schedule.sample_shape, schedule.configs)]
