"""The per-layer precision plan: what each layer was asked for, how its numbers are stored
in each graph flavour, and how each backend executes it. One declarative, saved object."""
from __future__ import annotations

import onnx

from ptqd.calibration.params import ConfigQuant

CONV_OPS = ("Conv", "ConvTranspose")


def _storage(op: str, config, denoiser: str) -> dict:
    """How a quantized layer of `config` is stored and run, in the words of its format."""
    return STORAGE[config.fmt](op, config, denoiser)


def _int_storage(op: str, config, denoiser: str) -> dict:
    weight_bits, act_bits = config.weight_bits, config.act_bits
    w_trt = "INT8" if weight_bits == 8 else "INT8 holding the 4-bit grid [-8, 7]"
    a_trt = "INT8" if act_bits == 8 else "Clip to the 4-bit grid + INT8"
    return {
        "tensorrt": {"graph": f"{denoiser}_<cfg>.onnx", "weights": w_trt, "activations": a_trt,
                     "scales": "FP16 (the Q input's type; DQ emits FP16)",
                     "executes": "INT8 kernel" + ("" if op in CONV_OPS else " (INT4 in TensorRT is "
                                                  "weight-only, which would drop the activation quantization)")},
        "onnxruntime": {"graph": f"{denoiser}_<cfg>.ort.onnx", "weights": f"INT{weight_bits}",
                        "activations": f"INT{act_bits}",
                        "executes": "dequantized to float, float kernel (input-only QDQ is not "
                                    "fused); the exact twin of the fake-quant model"},
        "onnxruntime-fast": {"graph": f"{denoiser}_<cfg>.cpu.onnx", "weights": w_trt, "activations": a_trt,
                             "outputs": "INT8 (calibrated scale)",
                             "executes": {"Conv": "QLinearConv", "MatMul": "QLinearMatMul",
                                          "Gemm": "QGemm"}.get(op, "float")},
    }


def _fp8_storage(op: str, config, denoiser: str) -> dict:
    fp8 = "FLOAT8E4M3FN (E4M3, saturating at +-448 x scale)"
    return {
        "tensorrt": {"graph": f"{denoiser}_fp8.onnx", "weights": fp8, "activations": fp8,
                     "scales": "FP16 (the Q input's type; DQ emits FP16)",
                     "executes": "FP8 kernel (Ada and Hopper GPUs; compute capability >= 8.9)"},
        "onnxruntime": {"graph": f"{denoiser}_fp8.ort.onnx", "weights": fp8, "activations": fp8,
                        "executes": "dequantized to float, float kernel; the exact twin of the fake-quant "
                                    "model (also the CPU graph: onnxruntime has no FP8 kernels)"},
    }


# per runtime.formats format that quantizes: its precision-plan text
STORAGE = {"int": _int_storage, "fp8": _fp8_storage}


def precision_plan(nodes: dict, params: dict[str, ConfigQuant], fp_model: onnx.ModelProto, family, denoiser: str,
                   fp32_exceptions: dict[str, dict[str, str]] | None = None) -> dict:
    """fp32_exceptions: per configuration, its TensorRT graph's nodes kept FP32 (name -> reason);
    each layer's role is its model family's word for it (families.base.ModelFamily.layer_role)."""
    float_matmuls = sorted(n.name for n in fp_model.graph.node if n.op_type == "MatMul"
                           and n.name not in {node.name for node in nodes.values()})
    kept, floating = kept_storage(denoiser), float_storage(denoiser)
    plan = {"format_version": 1, "family": family.name, "configs": {}}
    for cfg, quant in sorted(params.items()):
        layers = []
        for name, node in sorted(nodes.items()):
            role = family.layer_role(name, "conv" if node.op_type in CONV_OPS else "linear")
            entry = {"layer": name, "node": node.name, "op": node.op_type, "role": role}
            if name in quant.layers:
                entry.update(requested=cfg, **_storage(node.op_type, quant.config, denoiser))
            elif not quant.config.quantized:
                entry.update(requested=cfg, reason="the float engine: nothing quantized", **floating)
            else:
                entry.update(requested="fp32", reason=family.keep_reason, **kept)
            layers.append(entry)
        plan["configs"][cfg] = {"layers": layers, "float_ops": {
            "attention_matmuls": float_matmuls,
            "reason": "attention score matmuls (QK^T, PV) stay in float unless asked (PTQD.md §1)"},
            "tensorrt_float": tensorrt_float((fp32_exceptions or {}).get(cfg, {}))}
    return plan


def kept_storage(denoiser: str) -> dict:
    """A layer kept in float: FP16 in the graph TensorRT builds, FP32 in ONNX Runtime's graphs."""
    return {"tensorrt": {"graph": f"{denoiser}_<cfg>.onnx", "weights": "FP16", "executes": "FP16 kernel"},
            "onnxruntime": {"graph": f"{denoiser}_<cfg>.ort.onnx", "weights": "FP32", "executes": "FP32 kernel"}}


def float_storage(denoiser: str) -> dict:
    """The float configuration (fp16): TensorRT builds its FP16 graph, ONNX Runtime the FP32 one."""
    return {"tensorrt": {"graph": f"{denoiser}_fp16.onnx", "weights": "FP16", "executes": "FP16 kernel"},
            "onnxruntime": {"graph": f"{denoiser}_fp32.onnx", "weights": "FP32", "executes": "FP32 kernel"}}


def tensorrt_float(exceptions: dict[str, str]) -> dict:
    """The float path of the TensorRT graph (exporter/fp16.py), with its FP32 exceptions."""
    return {"type": "FP16",
            "interface": "float32 inputs and output, each behind one Cast (class_labels stays int64)",
            "why": "TensorRT builds strongly typed: every op runs in its tensors' type",
            "fp32_exceptions": [{"node": n, "reason": r} for n, r in sorted(exceptions.items())]}
