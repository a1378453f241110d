"""The output directory's names, in one place: its folders, the files that more than one
stage (or the Triton model) reads, each graph flavour's file in OUT/onnx, the graphs'
tensor interfaces, and the list of graphs a deployment consists of (`deployment`). Every
stage, `ptqd verify`, `ptqd sample` and the Triton repository name files through here, so
none of them reaches into another stage for a file name."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqd.runtime.formats import parse_config

# OUT's folders, one per stage (ARCHITECTURE.md)
CALIBRATION_DIR = "calibration"
ONNX_DIR = "onnx"
SCHEDULER_DIR = "scheduler"
ENGINES_DIR = "engines"
TRITON_DIR = "triton"
REPORT_DIR = "report"
KUBERNETES_DIR = "kubernetes"

# OUT/scheduler: the folded PTQD schedule, and how a conditional / latent model is run
SCHEDULE_FILE = "ptqd_schedule.json"
SPEC_FILE = "pipeline.json"
# OUT/engines: the ONNX Runtime engines (and their batch profile) where TensorRT is absent
ORT_MANIFEST = "onnxruntime.json"
# OUT/engines: a plan's measured latency at its opt batch (ptqd/engines/timing.py), per plan stem
TIMING_FILE = "{name}.timing.json"

# The denoiser's name in file, plan and Triton model names: its folder in a diffusers pipeline
# ("unet", "transformer"; ptqd.families says which). Outputs made before model families, and
# every UNet family, use "unet".
DEFAULT_DENOISER = "unet"
# Every denoiser graph's interface (batch axis dynamic); the Triton models use the same names.
INPUT_NAMES = ("sample", "timestep")
OUTPUT_NAME = "noise_pred"

# Latent and text-conditioned models: the FP32 graphs around the denoiser, and (in
# OUT/scheduler) the tokenizer files the runtime reads, one folder per text encoder.
VAE_DECODER = "vae_decoder"
VAE_DECODER_GRAPH = "vae_decoder.onnx"
TEXT_ENCODER_GRAPH = "text_encoder.onnx"   # the first (or only) text encoder's
# the FP16 copy of a graph (same float32 interface) that TensorRT builds: a strongly typed
# build takes the graph's precision, so the FP32 graph would make an FP32 engine
FP16_GRAPH = "{name}.fp16.onnx"
TOKENIZER_DIR = "tokenizer"
# their interfaces (batch axis first, dynamic), shared by the exporter, engines and Triton
VAE_INPUT, VAE_OUTPUT = "latents", "images"               # [N, C, h, w] -> [N, 3, H, W] in [-1, 1]
TOKENS_INPUT, TEXT_OUTPUT = "input_ids", "encoder_hidden_states"   # [N, L] int64 -> [N, L, D]
MASK_INPUT = "attention_mask"                             # [N, L] int64: a T5 encoder's padding mask
CLASS_INPUT = "class_labels"                              # the denoiser's class input, [N] int64
GRAPH_FILES = {
    "tensorrt": "{denoiser}_{cfg}.onnx",      # TensorRT's placement, 4-bit grid in INT8 storage
    "onnxruntime": "{denoiser}_{cfg}.ort.onnx",  # same placement, INT4 storage: fake-quant's twin
    "cpu-fast": "{denoiser}_{cfg}.cpu.onnx",   # outputs quantized too, for onnxruntime's fusions
}


def external_data_path(graph: Path) -> Path:
    """Where a graph too big for one protobuf message keeps its weights (exporter.graph_io):
    beside it, under a name recorded inside the graph, so copies keep that name."""
    return graph.with_name(graph.name + ".data")


def graph_files(graph: Path) -> list[Path]:
    """The graph file, then its external-data file if it has one."""
    data = external_data_path(graph)
    return [graph, data] if data.is_file() else [graph]


def fp_graph_name(denoiser: str = DEFAULT_DENOISER) -> str:
    return f"{denoiser}_fp32.onnx"


def graph_path(onnx_dir: Path, cfg: str, flavour: str, denoiser: str = DEFAULT_DENOISER) -> Path:
    """The graph a configuration of the denoiser runs in a flavour. Two flavours share a file
    where one graph serves both: the float engine (fp16) is the FP32 graph in ONNX Runtime
    (FP32 CPU kernels; TensorRT gets its FP16 graph), and onnxruntime has no FP8 kernels to fuse
    into, so fp8's CPU graph is its reference graph."""
    if cfg == "fp32":
        return onnx_dir / fp_graph_name(denoiser)
    fmt = parse_config(cfg)[0]
    if not fmt.quantized and flavour != "tensorrt":
        return onnx_dir / fp_graph_name(denoiser)
    if fmt.cpu_fast_is_reference and flavour == "cpu-fast":
        flavour = "onnxruntime"
    return onnx_dir / GRAPH_FILES[flavour].format(denoiser=denoiser, cfg=cfg)


def denoiser_model_name(denoiser: str, cfg: str) -> str:
    """A configuration's plan stem and Triton model name: unet_w4a8, transformer_fp8."""
    return f"{denoiser}_{cfg}"


# A graph's tensors as the Triton configs and the sampler's BLS calls both describe them:
# (name, numpy dtype name, per-sample dims). A per-sample scalar (timestep, class label) has
# dims []: Triton's per-request shape must have a dim, so it travels as [batch, 1] and the
# config's `reshape: []` hands the engine [batch].
Tensor = tuple[str, str, list[int]]
Interface = tuple[list[Tensor], list[Tensor]]   # (inputs, outputs)


def denoiser_io(sample_shape: list[int], conditioning: list[dict] = ()) -> Interface:
    """sample, timestep, then a conditional model's inputs (PipelineSpec.denoiser_inputs) -> eps."""
    inputs = [(INPUT_NAMES[0], "float32", list(sample_shape)), (INPUT_NAMES[1], "float32", [])]
    inputs += [(c["name"], c["dtype"], list(c["dims"])) for c in conditioning]
    return inputs, [(OUTPUT_NAME, "float32", list(sample_shape))]


def vae_decoder_io(latent_shape: list[int], image_shape: list[int]) -> Interface:
    return [(VAE_INPUT, "float32", list(latent_shape))], [(VAE_OUTPUT, "float32", list(image_shape))]


def text_encoder_io(encoder: dict) -> Interface:
    """input_ids [L] (and a T5 encoder's attention_mask [L]) -> the denoiser inputs this
    encoder makes (PipelineSpec.text_encoders entry: max_length, mask, outputs)."""
    length = [encoder["max_length"]]
    inputs = [(TOKENS_INPUT, "int64", length)] + ([(MASK_INPUT, "int64", length)] if encoder.get("mask") else [])
    return inputs, [(o["name"], "float32", list(o["dims"])) for o in encoder["outputs"]]


# what a graph of a deployment does
DENOISER_ROLE, TEXT_ENCODER_ROLE, VAE_DECODER_ROLE = "denoiser", "text_encoder", "vae_decoder"


@dataclass(frozen=True)
class DeployedGraph:
    """One graph of a deployment: what the engines stage builds, the Triton repository serves,
    `ptqd sample` runs and `ptqd verify` checks, under one name (plan stem, Triton model)."""
    name: str              # unet_w4a8, transformer_fp16, text_encoder_2, vae_decoder
    role: str              # DENOISER_ROLE, TEXT_ENCODER_ROLE or VAE_DECODER_ROLE
    config: str            # the denoiser's configuration; fp16 or fp32 for the decoder and text encoders
    tensorrt_graph: str    # the file in OUT/onnx that TensorRT builds
    cpu_graph: str         # the file in OUT/onnx that ONNX Runtime runs instead
    io: Interface

    @property
    def plan_name(self) -> str:
        return f"{self.name}.plan"


def deployment(spec, sample_shape: list[int], configs: list[str]) -> list[DeployedGraph]:
    """The graphs a deployment of `spec` (a runtime.conditioning.PipelineSpec) consists of: the
    denoiser once per configuration in `configs` (its TensorRT graph, and the CPU-fast graph
    ONNX Runtime runs), then each text encoder, then the VAE decoder (ONNX Runtime runs their
    FP32 graphs; TensorRT builds the FP16 copies, a T5 encoder's FP32 graph). Listed here once;
    the engines, Triton, sampling and verify loop over it."""
    denoiser = spec.denoiser
    graphs = [DeployedGraph(denoiser_model_name(denoiser, cfg), DENOISER_ROLE, cfg,
                            graph_path(Path(), cfg, "tensorrt", denoiser).name,
                            graph_path(Path(), cfg, "cpu-fast", denoiser).name,
                            denoiser_io(sample_shape, spec.denoiser_inputs))
              for cfg in configs]
    for encoder in spec.text_encoders:
        name, fp16 = encoder["name"], encoder.get("fp16", False)
        graphs.append(DeployedGraph(name, TEXT_ENCODER_ROLE, "fp16" if fp16 else "fp32",
                                    FP16_GRAPH.format(name=name) if fp16 else f"{name}.onnx", f"{name}.onnx",
                                    text_encoder_io(encoder)))
    if spec.latent:
        graphs.append(DeployedGraph(VAE_DECODER, VAE_DECODER_ROLE, "fp16", FP16_GRAPH.format(name=VAE_DECODER),
                                    VAE_DECODER_GRAPH, vae_decoder_io(sample_shape, spec.image_shape)))
    return graphs
