"""What the engines stage builds: one engine per bit configuration of the schedule and, for
latent and text-conditioned models, the VAE decoder (from its FP16 copy) and the FP32 text
encoder beside them. The TensorRT builder, the generated build script and the ONNX Runtime
engines all work from this list."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqd.runtime.conditioning import PipelineSpec
from ptqd.engines.profiles import BatchProfile, batched_shapes, input_shapes
from ptqd.runtime.layout import (FP16_GRAPH, TEXT_ENCODER_GRAPH, TOKENS_INPUT, VAE_DECODER_GRAPH, VAE_INPUT,
                                       graph_path)
from ptqd.runtime.schedule import FoldedSchedule


@dataclass(frozen=True)
class EngineJob:
    name: str          # the plan's stem: unet_w4a8, vae_decoder, text_encoder
    config: str        # the bit configuration; fp16 / fp32 for the decoder / text encoder
    onnx: Path         # the graph TensorRT builds
    cpu_onnx: Path     # the graph ONNX Runtime runs instead (CPU-fast UNet, FP32 decoder/encoder)
    shapes: dict       # per input: (min, opt, max)
    note: str

    @property
    def plan_name(self) -> str:
        return f"{self.name}.plan"


def engine_jobs(out: Path, profile: BatchProfile) -> list[EngineJob]:
    schedule = FoldedSchedule.load(out / "scheduler")
    spec = PipelineSpec.load(out / "scheduler")
    jobs = []
    for config in schedule.configs:
        steps = sum(1 for s in schedule.steps if s.config == config)
        note = f"{config}: runs {steps} of the schedule's steps" + (
            " (guided: 2 UNet samples per image)" if spec.guided else "")
        jobs.append(EngineJob(f"unet_{config}", config, graph_path(out / "onnx", config, "tensorrt"),
                              graph_path(out / "onnx", config, "cpu-fast"),
                              input_shapes(schedule.sample_shape, profile, spec.unet_inputs), note))
    # the decoder and text encoder see one row per image (the text encoder two per guided image,
    # in two calls of one chunk each), never more than the UNet's batch
    if spec.latent:
        jobs.append(EngineJob("vae_decoder", "fp16", out / "onnx" / FP16_GRAPH.format(name="vae_decoder"),
                              out / "onnx" / VAE_DECODER_GRAPH,
                              batched_shapes({VAE_INPUT: schedule.sample_shape}, profile),
                              "the VAE decoder, FP16: once per image after the last step"))
    if spec.kind == "text":
        jobs.append(EngineJob("text_encoder", "fp32", out / "onnx" / TEXT_ENCODER_GRAPH,
                              out / "onnx" / TEXT_ENCODER_GRAPH,
                              batched_shapes({TOKENS_INPUT: [spec.max_length]}, profile),
                              "the text encoder, FP32: once per chunk of prompts"))
    return jobs
