"""The output directory's names, in one place: its folders, the files that more than one
stage (or the Triton model) reads, each graph flavour's file in OUT/onnx, and the graphs'
tensor interfaces. Every stage, `ptqd verify`, `ptqd sample` and the Triton repository name
files through here, so none of them reaches into another stage for a file name."""
from __future__ import annotations

from pathlib import Path

# OUT's folders, one per stage (ARCHITECTURE.md)
CALIBRATION_DIR = "calibration"
ONNX_DIR = "onnx"
SCHEDULER_DIR = "scheduler"
ENGINES_DIR = "engines"
TRITON_DIR = "triton"
REPORT_DIR = "report"

# OUT/scheduler: the folded PTQD schedule, and how a conditional / latent model is run
SCHEDULE_FILE = "ptqd_schedule.json"
SPEC_FILE = "pipeline.json"
# OUT/engines: the ONNX Runtime engines (and their batch profile) where TensorRT is absent
ORT_MANIFEST = "onnxruntime.json"
# OUT/engines: a plan's measured latency at its opt batch (ptqd/engines/timing.py), per plan stem
TIMING_FILE = "{name}.timing.json"

# Every UNet graph's interface (batch axis dynamic); the Triton models use the same names.
INPUT_NAMES = ("sample", "timestep")
OUTPUT_NAME = "noise_pred"

FP_GRAPH = "unet_fp32.onnx"
# Latent and text-conditioned models: the FP32 graphs around the UNet, and (in OUT/scheduler)
# the tokenizer files the runtime reads.
VAE_DECODER_GRAPH = "vae_decoder.onnx"
TEXT_ENCODER_GRAPH = "text_encoder.onnx"
# the FP16 copy of the VAE decoder (same float32 interface) that TensorRT builds: a strongly
# typed build takes the graph's precision, so the FP32 graph would make an FP32 engine
FP16_GRAPH = "{name}.fp16.onnx"
TOKENIZER_DIR = "tokenizer"
# their interfaces (batch axis first, dynamic), shared by the exporter, engines and Triton
VAE_INPUT, VAE_OUTPUT = "latents", "images"               # [N, C, h, w] -> [N, 3, H, W] in [-1, 1]
TOKENS_INPUT, TEXT_OUTPUT = "input_ids", "encoder_hidden_states"   # [N, L] int64 -> [N, L, D]
CLASS_INPUT = "class_labels"                              # the UNet's class input, [N] int64
GRAPH_FILES = {
    "tensorrt": "unet_{cfg}.onnx",      # TensorRT's placement, 4-bit grid in INT8 storage
    "onnxruntime": "unet_{cfg}.ort.onnx",  # same placement, INT4 storage: fake-quant's twin
    "cpu-fast": "unet_{cfg}.cpu.onnx",   # outputs quantized too, for onnxruntime's fusions
}


def external_data_path(graph: Path) -> Path:
    """Where a graph too big for one protobuf message keeps its weights (exporter.graph_io):
    beside it, under a name recorded inside the graph, so copies keep that name."""
    return graph.with_name(graph.name + ".data")


def graph_files(graph: Path) -> list[Path]:
    """The graph file, then its external-data file if it has one."""
    data = external_data_path(graph)
    return [graph, data] if data.is_file() else [graph]


def graph_path(onnx_dir: Path, cfg: str, flavour: str) -> Path:
    """The graph a configuration runs in a flavour. Two flavours share a file where one graph
    serves both: the float engine (fp16) is the FP32 graph in ONNX Runtime (FP32 CPU kernels;
    TensorRT gets its FP16 graph), and onnxruntime has no FP8 kernels to fuse into, so fp8's
    CPU graph is its reference graph."""
    if cfg == "fp32" or (cfg == "fp16" and flavour != "tensorrt"):
        return onnx_dir / FP_GRAPH
    if cfg == "fp8" and flavour == "cpu-fast":
        flavour = "onnxruntime"
    return onnx_dir / GRAPH_FILES[flavour].format(cfg=cfg)


# A graph's tensors as the Triton configs and the sampler's BLS calls both describe them:
# (name, numpy dtype name, per-sample dims). A per-sample scalar (timestep, class label) has
# dims []: Triton's per-request shape must have a dim, so it travels as [batch, 1] and the
# config's `reshape: []` hands the engine [batch].
Tensor = tuple[str, str, list[int]]
Interface = tuple[list[Tensor], list[Tensor]]   # (inputs, outputs)


def unet_io(sample_shape: list[int], conditioning: list[dict] = ()) -> Interface:
    """sample, timestep, then a conditional model's inputs (PipelineSpec.unet_inputs) -> eps."""
    inputs = [(INPUT_NAMES[0], "float32", list(sample_shape)), (INPUT_NAMES[1], "float32", [])]
    inputs += [(c["name"], c["dtype"], list(c["dims"])) for c in conditioning]
    return inputs, [(OUTPUT_NAME, "float32", list(sample_shape))]


def vae_decoder_io(latent_shape: list[int], image_shape: list[int]) -> Interface:
    return [(VAE_INPUT, "float32", list(latent_shape))], [(VAE_OUTPUT, "float32", list(image_shape))]


def text_encoder_io(max_length: int, state_dims: list[int]) -> Interface:
    """input_ids [L] -> the UNet's encoder_hidden_states [L, D]."""
    return [(TOKENS_INPUT, "int64", [max_length])], [(TEXT_OUTPUT, "float32", list(state_dims))]
