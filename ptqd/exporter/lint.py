"""`ptqd lint`: a QDQ graph checked against TensorRT's explicit-quantization rules, and (for
TensorRT, which builds strongly typed) against FP32 compute outside the declared exceptions.

Each violation names the node and the rule (BACKENDS.md, TRT_API.md §3). The `onnxruntime`
target drops the rules that exist only because of TensorRT's kernels (INT4 is weight-only
and blocked, no INT4 convolution), since ONNX Runtime executes those graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ptqd.exporter.fp16 import EXCEPTIONS_KEY, fp32_exceptions, fp32_slot
from ptqd.exporter.graph_io import weightless
from ptqd.runtime.formats import BLOCKED_OPSET, PER_AXIS_OPSET, TYPE_OPSET

TARGETS = ("tensorrt", "onnxruntime")
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
RULES = {
    "zero-point": "zero points must be all-zero constants (TensorRT is symmetric only)",
    "scale-constant": "scales must be build-time constants (initializers)",
    "scale-positive": "every scale must be strictly positive",
    "activation-per-tensor": "activations are quantized per tensor (scalar scale)",
    "weight-axis": "per-channel weight scales must lie on the consumer's output-channel axis",
    "dedicated-pair": "each consumer needs its own Q/DQ pair (a DQ output feeds one node)",
    "placement": "activation Q/DQ belongs on the inputs of Conv/Gemm/MatMul only, "
                 "not on layer outputs feeding other ops",
    "int4-activation": "INT4 is weight-only in TensorRT",
    "int4-conv": "TensorRT has no INT4 convolution (store the 4-bit grid as INT8)",
    "int4-blocked": "INT4 MatMul/Gemm weights need block quantization (block 64 or 128)",
    "fp4-blocked": "FP4 (NVFP4) is for MatMul/Gemm only, in blocks of 16 with E4M3 block scales under an "
                   "FP32 global scale",
    "block-axis": "weight blocks run along the reduction axis of the MatMul/Gemm they feed",
    "opset": "FP4 needs opset >= 23, INT4 and block quantization >= 21, FP8 >= 19, per-channel >= 13",
    "fp8-int8-mix": "a layer's weight and input must both be FP8 or both INT8: TensorRT has no kernel "
                    "that mixes the two",
    "fp32-compute": "a strongly typed TensorRT build runs an op on FP32 tensors in FP32: make it FP16 "
                    f"or name it in the graph's {EXCEPTIONS_KEY} metadata with its reason",
}
# TensorRT-specific: INT4 kernels, and the placement TensorRT fuses best; onnxruntime's
# fast graphs need the opposite placement (quantized outputs feeding several ops).
TRT_ONLY = {"int4-activation", "int4-conv", "int4-blocked", "placement", "dedicated-pair", "fp32-compute",
            "fp8-int8-mix", "fp4-blocked"}
# TensorRT's dynamic block quantize (NVFP4 activations): its outputs are the FP4 values and
# their E4M3 block scales, which DQs read
DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"
NVFP4_BLOCK = 16
EIGHT_BIT = (TensorProto.INT8, TensorProto.FLOAT8E4M3FN)
# Not compute: a Cast is the boundary between precisions (the graph's float32 I/O included),
# Constant creates data, Shape/Size read only a tensor's dimensions.
NOT_COMPUTE = ("Cast", "Constant", "Shape", "Size")


@dataclass(frozen=True)
class Violation:
    node: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.node}: [{self.rule}] {RULES[self.rule]} ({self.detail})"


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def attr(self, node, name, default=None):
        return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)

    def constant(self, name: str) -> np.ndarray | None:
        """A build-time constant's value: an initializer, a Constant node, or the DQ of constants
        (NVFP4's two-level weight scales: E4M3 block scales times an FP32 global scale)."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(self.attr(node, "value"))
        if node is not None and node.op_type == "DequantizeLinear" and not self.attr(node, "block_size", 0):
            values, scale = self.constant(node.input[0]), self.constant(node.input[1])
            if values is not None and scale is not None and scale.size == 1:
                return values.astype(np.float32) * scale.astype(np.float32)
        return None

    def run_time_scale(self, name: str) -> bool:
        """A scale computed at run time by design: the DQ of the block scales a dynamic
        quantize produced."""
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return False
        source = self.producer.get(node.input[0])
        return source is not None and source.op_type == DYNAMIC_QUANTIZE

    def dtype(self, name: str) -> int | None:
        """A constant's element type (an initializer or a Constant node's value)."""
        if name in self.inits:
            return self.inits[name].data_type
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return self.attr(node, "value").data_type
        return None

    def quantized_type(self, node) -> int | None:
        """The element type on a Q/DQ node's quantized side: its zero point's, else a DQ's
        constant input's."""
        if len(node.input) > 2 and node.input[2]:
            return self.dtype(node.input[2])
        return self.dtype(node.input[0]) if node.op_type == "DequantizeLinear" else None


def _check_qdq_node(g: _Graph, node, out: list[Violation]) -> None:
    scale = g.constant(node.input[1])
    if scale is None:
        if not g.run_time_scale(node.input[1]):
            out.append(Violation(node.name, "scale-constant", f"scale {node.input[1]} is computed"))
    elif not (scale > 0).all():
        out.append(Violation(node.name, "scale-positive", f"min scale {scale.min():g}"))
    if len(node.input) > 2 and node.input[2]:
        zp = g.constant(node.input[2])
        if zp is None or np.any(zp.astype(np.float32) != 0):
            out.append(Violation(node.name, "zero-point", f"zero point {node.input[2]}"))
    qtype = g.quantized_type(node)
    if qtype is not None:
        name = TensorProto.DataType.Name(qtype)
        if g.opset < TYPE_OPSET.get(name, 0):
            out.append(Violation(node.name, "opset", f"{name} at opset {g.opset}, needs {TYPE_OPSET[name]}"))
    if scale is not None and scale.size > 1:
        needed = BLOCKED_OPSET if g.attr(node, "block_size", 0) else PER_AXIS_OPSET
        if g.opset < needed:
            out.append(Violation(node.name, "opset", f"opset {g.opset}, needs {needed}"))


def _check_quantize(g: _Graph, node, out: list[Violation]) -> None:
    scale = g.constant(node.input[1])
    if scale is not None and scale.size > 1:
        out.append(Violation(node.name, "activation-per-tensor", f"scale has {scale.size} values"))
    zp = node.input[2] if len(node.input) > 2 else ""
    if zp and g.dtype(zp) == TensorProto.INT4:
        out.append(Violation(node.name, "int4-activation", "QuantizeLinear to INT4"))


def _scale_of(user, name: str) -> bool:
    """Whether `user` reads `name` as a DequantizeLinear's scale (a two-level block scale)."""
    return user.op_type == "DequantizeLinear" and len(user.input) > 1 and user.input[1] == name


def _check_dequantize(g: _Graph, node, out: list[Violation]) -> None:
    users = g.consumers.get(node.output[0], [])
    if len(users) > 1:
        out.append(Violation(node.name, "dedicated-pair", f"feeds {len(users)} nodes"))
    if node.input[0] not in g.inits:
        for user in users:
            if user.op_type not in WEIGHTED and not _scale_of(user, node.output[0]):
                out.append(Violation(node.name, "placement", f"feeds {user.op_type} {user.name}"))
        source = g.producer.get(node.input[0])
        if source is not None and source.op_type == DYNAMIC_QUANTIZE and node.input[0] == source.output[0]:
            _check_fp4_blocks(g, node, source, out)
        return
    weight = g.inits[node.input[0]]
    for user in users:
        if not _scale_of(user, node.output[0]):
            _check_weight_use(g, node, weight, user, out)


def _check_fp4_blocks(g: _Graph, dq, source, out: list[Violation]) -> None:
    """NVFP4 activations: blocks of 16 on the last axis, in the quantize and its DQ alike."""
    for n in (source, dq):
        block, axis = g.attr(n, "block_size", 0), g.attr(n, "axis", 1)
        if block != NVFP4_BLOCK or axis != -1:
            out.append(Violation(n.name, "fp4-blocked", f"block_size {block}, axis {axis}"))


def _check_weight_use(g: _Graph, dq, weight, user, out: list[Violation]) -> None:
    rank = len(weight.dims)
    scale = g.constant(dq.input[1])
    block = g.attr(dq, "block_size", 0)
    if scale is not None and scale.size > 1 and not block:
        axis = g.attr(dq, "axis", 1) % rank
        if user.op_type == "MatMul":
            expected = rank - 1
        elif user.op_type == "Gemm":
            expected = 0 if g.attr(user, "transB", 0) else 1
        elif user.op_type == "ConvTranspose":
            expected = 1
        else:
            expected = 0
        if axis != expected:
            out.append(Violation(dq.name, "weight-axis", f"axis {axis} for {user.op_type}, expected {expected}"))
    act = g.producer.get(user.input[0])
    act_type = g.dtype(act.input[2]) if act is not None and act.op_type == "DequantizeLinear" and len(act.input) > 2 else None
    if weight.data_type in EIGHT_BIT and act_type in EIGHT_BIT and act_type != weight.data_type:
        names = {TensorProto.INT8: "INT8", TensorProto.FLOAT8E4M3FN: "FP8"}
        out.append(Violation(dq.name, "fp8-int8-mix", f"{names[weight.data_type]} weight, "
                             f"{names[act_type]} input into {user.name}"))
    if block and user.op_type in ("MatMul", "Gemm") and rank == 2:
        # the reduction axis: K of MatMul's [K, N]; of Gemm's weight, 1 with transB, else 0
        reduction = (1 if g.attr(user, "transB", 0) else 0) if user.op_type == "Gemm" else 0
        if g.attr(dq, "axis", 1) % rank != reduction:
            out.append(Violation(dq.name, "block-axis", f"axis {g.attr(dq, 'axis', 1)} for {user.op_type}, "
                                 f"expected {reduction}"))
    if weight.data_type == TensorProto.INT4:
        if user.op_type in ("Conv", "ConvTranspose"):
            out.append(Violation(dq.name, "int4-conv", f"INT4 weight feeds {user.name}"))
        elif block not in (64, 128):
            out.append(Violation(dq.name, "int4-blocked", f"block_size {block or 'none'}"))
    if weight.data_type == TensorProto.FLOAT4E2M1:
        scale_source = g.producer.get(dq.input[1])
        two_level = (scale_source is not None and scale_source.op_type == "DequantizeLinear"
                     and g.dtype(scale_source.input[0]) == TensorProto.FLOAT8E4M3FN)
        if user.op_type not in ("MatMul", "Gemm") or block != NVFP4_BLOCK or not two_level:
            out.append(Violation(dq.name, "fp4-blocked", f"feeds {user.op_type}, block_size {block or 'none'}, "
                                 + ("E4M3 block scales" if two_level else "block scales not E4M3 x global")))


def _check_fp32_compute(model: onnx.ModelProto, out: list[Violation]) -> None:
    try:
        # types need no weights, and a UNet past 2 GiB cannot serialize
        inferred = onnx.shape_inference.infer_shapes(weightless(model))
    except Exception as exc:  # a graph ONNX cannot type cannot be judged on types
        out.append(Violation(model.graph.name or "graph", "fp32-compute", f"type inference failed: {exc}"))
        return
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    exceptions = fp32_exceptions(model)
    for node in g.node:
        if node.op_type in NOT_COMPUTE or node.name in exceptions:
            continue
        fp32 = [name for i, name in enumerate(node.input)
                if name and types.get(name) == TensorProto.FLOAT and not fp32_slot(node.op_type, i)]
        fp32 += [name for name in node.output if types.get(name) == TensorProto.FLOAT]
        if fp32:
            out.append(Violation(node.name, "fp32-compute", f"{node.op_type} on FP32 {fp32[0]}"))


def lint_model(model: onnx.ModelProto, target: str = "tensorrt") -> list[Violation]:
    if target not in TARGETS:
        raise ValueError(f"unknown lint target {target!r}")
    g = _Graph(model)
    out: list[Violation] = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq_node(g, node, out)
        if node.op_type == "QuantizeLinear":
            _check_quantize(g, node, out)
        elif node.op_type == "DequantizeLinear":
            _check_dequantize(g, node, out)
        elif node.op_type == DYNAMIC_QUANTIZE:
            _check_qdq_node(g, node, out)
    if target == "tensorrt":
        _check_fp32_compute(model, out)
    else:
        out = [v for v in out if v.rule not in TRT_ONLY]
    return out


def lint_graph_file(path, target: str) -> list[Violation]:
    from ptqd.errors import UserError

    try:
        model = onnx.load(str(path))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    return lint_model(model, target)
