"""The FP16 pass over a TensorRT-flavour QDQ graph: every float tensor inside becomes FP16.

Why: TensorRT builds these graphs strongly typed (TRT_API.md §3), so an op runs in the type
the graph gives its tensors; left FP32, GroupNorm, SiLU, attention, residual adds and the
layers kept in float would all run FP32 kernels. What changes:
  - float initializers (weights, biases, norm parameters, Q/DQ scales, Clip bounds) and the
    float values of Constant / ConstantOfShape nodes are stored as FP16;
  - Cast(to=FLOAT) becomes Cast(to=FLOAT16);
  - Q/DQ then follow by ONNX's own typing: a QuantizeLinear's FP16 scale matches its FP16
    input (TensorRT requires that match for FP16 scales), and a DequantizeLinear's output has
    its scale's type, so DQ emits FP16. FP16 scales need opset >= 19 (Q/DQ-19 widened T1 to
    float16); ptqd's graphs are opset 21 (onnx_fp.OPSET), checked below;
  - the graph's float inputs and outputs keep float32, each behind one Cast, so the sampler,
    the Triton configs and the build script call the graph as before.
Nodes named in `keep` stay FP32 behind Casts (the exceptions, each with its reason; they are
also written into the model's metadata, which `ptqd lint` reads). A slot ONNX types as
float32 whatever the data (Resize's roi and scales) keeps its type.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ptqd.exporter.graph_io import restore_weights, weightless

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
MIN_OPSET = 19
# metadata key of the FP32 exceptions: JSON {node name: reason}
EXCEPTIONS_KEY = "ptqd.fp32_exceptions"
# (op, input index) that ONNX types float32 independently of the data tensor, and NVFP4's
# global activation scale, which TensorRT's dynamic quantize takes in FP32 (as Model Optimizer
# writes it) whatever its input's type
FP32_SLOTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1), ("TRT_FP4DynamicQuantize", 1)}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)


def fp32_slot(op: str, index: int) -> bool:
    return (op, index) in FP32_SLOTS


def float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, from ONNX's (strict) type inference."""
    # types need no weights, and a UNet past 2 GiB cannot serialize
    inferred = onnx.shape_inference.infer_shapes(weightless(model), strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _to_fp16(array: np.ndarray, name: str, flush_ok: bool = False) -> np.ndarray:
    """FP16 copy; refused past FP16's range, and (unless flush_ok) where a nonzero value
    would round to zero: harmless for a weight's few tiny values, fatal for a Q/DQ scale."""
    finite = array[np.isfinite(array)]
    if finite.size and np.abs(finite).max() > FP16_MAX:
        raise ValueError(f"{name} holds {np.abs(finite).max():g}, beyond FP16's range ({FP16_MAX:g})")
    nonzero = np.abs(finite[finite != 0])
    if not flush_ok and nonzero.size and nonzero.min() < FP16_TINY:
        raise ValueError(f"{name} holds {nonzero.min():g}, which FP16 flushes to zero")
    return array.astype(np.float16)


def _retype_attributes(node) -> None:
    """Attributes that create float data: Cast's target, Constant / ConstantOfShape values."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = FLOAT16
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
            value = _to_fp16(numpy_helper.to_array(attr.t), f"{node.name}.{attr.name}")
            attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))
        elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
            raise ValueError(f"{node.name}: Constant {attr.name} cannot hold FP16; fold constants first")


class _Converter:
    """Converts `model` (a weightless view of `source`) in place; the float weights it makes
    FP16 are read from `source`."""

    def __init__(self, model: onnx.ModelProto, keep: dict[str, str], source: onnx.ModelProto):
        self.model, self.keep = model, keep
        self.types = float_types(model)
        self.inits = {i.name: i for i in source.graph.initializer}
        self.current: dict[str, int] = {}      # float tensor -> the type it has after the pass
        self.casts: dict[tuple[str, int], str] = {}
        self.nodes: list = []
        self.new_inits: list = []

    def is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == FLOAT

    def cast(self, name: str, to: int) -> str:
        """`name` converted to `to`, one Cast per tensor and type."""
        key = (name, to)
        if key not in self.casts:
            out = f"{name}/{'fp16' if to == FLOAT16 else 'fp32'}"
            self.nodes.append(helper.make_node("Cast", [name], [out], name=f"{out}/Cast", to=to))
            self.casts[key] = out
            self.current[out] = to
        return self.casts[key]

    def initializer(self, name: str, to: int, flush_ok: bool) -> str:
        if to == FLOAT:
            return name
        key = (name, FLOAT16)
        if key not in self.casts:
            value = _to_fp16(numpy_helper.to_array(self.inits[name]), name, flush_ok)
            self.new_inits.append(numpy_helper.from_array(value, f"{name}/fp16"))
            self.casts[key] = f"{name}/fp16"
        return self.casts[key]

    def source_type(self, name: str) -> int:
        return self.current.get(name, FLOAT)  # graph inputs and kept outputs are FP32

    def convert(self, node) -> None:
        kept = node.name in self.keep
        for i, name in enumerate(node.input):
            if not self.is_float(name) or node.op_type == "Cast":  # a Cast takes either type
                continue
            want = FLOAT if (kept or fp32_slot(node.op_type, i)) else FLOAT16
            if name in self.inits:
                node.input[i] = self.initializer(name, want, node.op_type not in QDQ_OPS)
            elif self.source_type(name) != want:
                node.input[i] = self.cast(name, want)
        if not kept:
            _retype_attributes(node)
        for out in node.output:
            if self.is_float(out):
                self.current[out] = FLOAT if kept else FLOAT16
        self.nodes.append(node)

    def finish(self) -> onnx.ModelProto:
        graph = self.model.graph
        for out in graph.output:
            if self.is_float(out.name) and self.source_type(out.name) != FLOAT:
                _rename(graph, self.nodes, out.name, f"{out.name}/fp16")
                self.nodes.append(helper.make_node("Cast", [f"{out.name}/fp16"], [out.name],
                                                   name=f"{out.name}/Cast", to=FLOAT))
        used = {i for n in self.nodes for i in n.input}
        kept_inits = [i for i in graph.initializer if i.name in used]
        del graph.node[:]
        graph.node.extend(self.nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept_inits + [i for i in self.new_inits if i.name in used])
        del graph.value_info[:]
        # fp16 copies took "<name>/fp16"; give them back the original names where the FP32
        # original is gone, so layer names (and the lint's messages) read as before
        for init in graph.initializer:
            if init.name.endswith("/fp16") and init.name[:-5] not in used:
                _rename(graph, graph.node, init.name, init.name[:-5])
                init.name = init.name[:-5]
        return self.model


def _rename(graph, nodes, old: str, new: str) -> None:
    for node in nodes:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name == old:
                    seq[i] = new


def convert_to_fp16(model: onnx.ModelProto, keep: dict[str, str] | None = None) -> onnx.ModelProto:
    """An FP16 copy of a float32 graph with float32 I/O; `keep`: node name -> why it stays FP32."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(f"FP16 Q/DQ scales need opset >= {MIN_OPSET}; the graph is opset {opset}")
    keep = dict(keep or {})
    missing = sorted(set(keep) - {n.name for n in model.graph.node})
    if missing:
        raise ValueError(f"FP32 exceptions name nodes the graph lacks: {', '.join(missing[:3])}")
    # on a weightless view: what the copy keeps of the FP32 weights (integer Q/DQ weights,
    # tensors that stay FP32) goes in at the end, so the graph's weights are never held twice
    copy = weightless(model)
    conv = _Converter(copy, keep, model)
    conv.current.update({i.name: FLOAT for i in copy.graph.input})
    for node in list(copy.graph.node):
        conv.convert(node)
    out = conv.finish()
    restore_weights(out, model)
    _set_exceptions(out, keep)
    return out


def _set_exceptions(model: onnx.ModelProto, keep: dict[str, str]) -> None:
    props = [p for p in model.metadata_props if p.key != EXCEPTIONS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    if keep:
        model.metadata_props.add(key=EXCEPTIONS_KEY, value=json.dumps(keep, sort_keys=True))


def fp32_exceptions(model: onnx.ModelProto) -> dict[str, str]:
    """The FP32 exceptions a graph declares (node name -> reason)."""
    value = next((p.value for p in model.metadata_props if p.key == EXCEPTIONS_KEY), None)
    return json.loads(value) if value else {}


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def input_path(model: onnx.ModelProto, input_name: str) -> list[str]:
    """The nodes computing from graph input `input_name` alone up to (not including) the first
    weighted layer or the first node that also reads other data, plus the float-creating nodes
    (ConstantOfShape, Constant) that feed only them: for `timestep`, the broadcast and the
    sinusoidal embedding up to the cast diffusers itself puts before time_embedding.linear_1."""
    consumers: dict[str, list] = {}
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    path, reached = {}, {input_name}

    def own(name: str) -> bool:  # from the path, or a constant
        src = producer.get(name)
        return not name or name in reached or (src is None and name not in {i.name for i in model.graph.input}) \
            or (src is not None and src.op_type in ("Constant", "ConstantOfShape"))

    frontier = [input_name]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in WEIGHTED_OPS or node.name in path or not all(map(own, node.input)):
                continue
            path[node.name] = node
            reached.update(node.output)
            frontier.extend(node.output)
    for node in model.graph.node:
        users = [u for o in node.output for u in consumers.get(o, [])]
        if node.op_type == "Cast" and node.name in path and not any(u.name in path for u in users):
            del path[node.name]  # the boundary cast becomes the cast to FP16
        elif node.op_type in ("Constant", "ConstantOfShape") and users and all(u.name in path for u in users):
            path[node.name] = node
    return [n.name for n in model.graph.node if n.name in path]


# Graph inputs whose path to the first weighted layer stays FP32, with the measured reason.
# Empty: FP16 rounds the sinusoid's argument (timestep x frequency, up to ~1000, FP16 spacing
# 0.5 there) and moves the built-in model's timestep embedding by up to 0.14, but keeping that
# path FP32 changed little downstream (benchmarks/fp16_graph.py, 10-step export, 160 held-out
# inputs: eps 9.10e-3 vs 8.95e-3 mean from the FP32 reference graph; 256 images: per-sample
# MSE 2.41e-5 vs 2.04e-5, against 4.0e-4 between the reference and the FP32 model). A model
# for which it matters names its input here ("timestep": reason), and input_path does the rest.
FP32_INPUT_PATHS: dict[str, str] = {}


def tensorrt_exceptions(model: onnx.ModelProto) -> dict[str, str]:
    """The nodes of a (folded) TensorRT graph that stay FP32, each with its reason."""
    inputs = {i.name for i in model.graph.input}
    return {node: reason for name, reason in FP32_INPUT_PATHS.items() if name in inputs
            for node in input_path(model, name)}
