"""The per-layer precision plan: what each layer was asked for, how its numbers are stored
in each graph flavour, and how each backend executes it. One declarative, saved object."""
from __future__ import annotations

import onnx

from ptqd.calibration.params import ConfigQuant
from ptqd.exporter.onnx_fp import CONV_OPS, node_kind


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


def _w4a16_storage(op: str, config, denoiser: str) -> dict:
    block = config.weight_layout.block
    int4 = f"INT4, symmetric, blocks of {block} input columns with FP32 scales (FP16 in TensorRT's graph)"
    return {
        "tensorrt": {"graph": f"{denoiser}_w4a16.onnx", "weights": int4, "activations": "FP16 (weight-only)",
                     "executes": "INT4 weight-only GEMM: 4-bit weights dequantized in the kernel, FP16 tensor cores"},
        "onnxruntime": {"graph": f"{denoiser}_w4a16.ort.onnx", "weights": int4, "activations": "FP32",
                        "executes": "blocked INT4 DequantizeLinear, float MatMul; the exact twin of the fake-quant model"},
        "onnxruntime-fast": {"graph": f"{denoiser}_w4a16.cpu.onnx", "weights": "UINT4 (the grid + 8) packed, FP32 "
                             "block scales", "activations": "FP32", "executes": "MatMulNBits (com.microsoft)"},
    }


def _nvfp4_storage(op: str, config, denoiser: str) -> dict:
    w, a = config.weight_layout, config.act_layout
    scales = f"E4M3 scale per {w.block} values under an FP32 global scale"
    return {
        "tensorrt": {"graph": f"{denoiser}_nvfp4.onnx", "weights": f"FLOAT4E2M1, {scales} (blocked DQ, opset 23)",
                     "activations": f"FLOAT4E2M1 by trt::TRT_FP4DynamicQuantize: blocks of {a.block} along the last "
                                    "axis, E4M3 block scales found at run time under the calibrated FP32 global scale",
                     "executes": "NVFP4 GEMM (FP4 tensor cores: Blackwell, compute capability >= 10.0, TensorRT >= 10.8)"},
        "onnxruntime": {"graph": f"{denoiser}_nvfp4.ort.onnx", "weights": f"E2M1 values held in FLOAT8E4M3FN, {scales}",
                        "activations": "the same dynamic block quantization in standard ops (ReduceMax, E4M3 "
                                       "QuantizeLinear of the block scale, E2M1 rounding by Where/Round)",
                        "executes": "dequantized to float, float kernel; the exact twin of the fake-quant model (also "
                                    "the CPU graph: onnxruntime has no FP4 kernels)"},
    }


# per runtime.formats format that quantizes: its precision-plan text
STORAGE = {"int": _int_storage, "fp8": _fp8_storage, "w4a16": _w4a16_storage, "nvfp4": _nvfp4_storage}


def precision_plan(nodes: dict, params: dict[str, ConfigQuant], fp_model: onnx.ModelProto, family, denoiser: str,
                   fp32_exceptions: dict[str, dict[str, str]] | None = None) -> dict:
    """fp32_exceptions: per configuration, its TensorRT graph's nodes kept FP32 (name -> reason);
    each layer's role is its model family's word for it (families.base.ModelFamily.layer_role)."""
    float_matmuls = sorted(n.name for n in fp_model.graph.node if n.op_type == "MatMul"
                           and n.name not in {node.name for node in nodes.values()})
    kept, floating = kept_storage(denoiser), float_storage(denoiser)
    dims = {i.name: tuple(i.dims) for i in fp_model.graph.initializer}
    plan = {"format_version": 1, "family": family.name, "configs": {}}
    for cfg, quant in sorted(params.items()):
        layers = []
        for name, node in sorted(nodes.items()):
            kind = node_kind(node)
            role = family.layer_role(name, kind)
            own = quant.config.for_kind(kind)
            entry = {"layer": name, "node": node.name, "op": node.op_type, "role": role}
            if own != quant.config:
                entry["format"] = own.name     # its kind's format in this configuration
            if name in quant.layers:
                entry.update(requested=cfg, **_storage(node.op_type, own, denoiser))
            elif not quant.config.quantized:
                entry.update(requested=cfg, reason="the float engine: nothing quantized", **floating)
            elif not own.quantized:
                entry.update(requested=cfg, reason=quant.config.format.why_by_kind, **kept)
            elif own.weight_layout.blocked and _reduction_width(node, dims) % own.weight_layout.block:
                entry.update(requested="fp32", reason=f"its input width is no whole number of {own.name}'s "
                             f"blocks of {own.weight_layout.block}", **kept)
            else:
                entry.update(requested="fp32", reason=family.keep_reason, **kept)
            layers.append(entry)
        plan["configs"][cfg] = {"layers": layers, "float_ops": {
            "attention_matmuls": float_matmuls,
            "reason": "attention score matmuls (QK^T, PV) stay in float unless asked (PTQD.md §1)"},
            "tensorrt_float": tensorrt_float((fp32_exceptions or {}).get(cfg, {}))}
    return plan


def _reduction_width(node, dims: dict) -> int:
    """The reduction width of a MatMul/Gemm's weight (MatMul's [K, N]; Gemm's [N, K] with transB)."""
    shape = dims.get(node.input[1], ())
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return shape[1] if node.op_type == "Gemm" and trans_b else shape[0]


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
