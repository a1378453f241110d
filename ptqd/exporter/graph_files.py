"""Where each graph flavour lives in OUT/onnx. Kept apart from the exporter (which needs
torch) so the sampler, the engines stage, the Triton repository and `ptqd verify` can name
graphs cheaply."""
from __future__ import annotations

from pathlib import Path

# Every UNet graph's interface (batch axis dynamic); the Triton models use the same names.
INPUT_NAMES = ("sample", "timestep")
OUTPUT_NAME = "noise_pred"

FP_GRAPH = "unet_fp32.onnx"
GRAPH_FILES = {
    "tensorrt": "unet_{cfg}.onnx",      # TensorRT's placement, 4-bit grid in INT8 storage
    "onnxruntime": "unet_{cfg}.ort.onnx",  # same placement, INT4 storage: fake-quant's twin
    "cpu-fast": "unet_{cfg}.cpu.onnx",   # outputs quantized too, for onnxruntime's fusions
}


def graph_path(onnx_dir: Path, cfg: str, flavour: str) -> Path:
    if cfg == "fp32":
        return onnx_dir / FP_GRAPH
    return onnx_dir / GRAPH_FILES[flavour].format(cfg=cfg)
