"""QuantizeLinear/DequantizeLinear insertion into the full-precision ONNX graph.

The graph is not re-traced from the fake-quant model: each calibrated layer is found in the
FP graph by name (onnx_fp.layer_nodes) and given, as its kind's format in the configuration
says (BitConfig.for_kind):
  - on its activation input, a dedicated Q -> DQ pair (per tensor, zero point 0); for NVFP4
    the dynamic block quantize TensorRT's parser takes (trt::TRT_FP4DynamicQuantize -> DQ of
    its E4M3 block scales -> blocked DQ, Model Optimizer's pattern, GROWTH.md), and in ONNX
    Runtime's graphs the same arithmetic in standard ops; nothing for weight-only layers;
  - its weight replaced by a quantized initializer -> DQ: per output channel on the
    consumer's axis (0 for Conv and Gemm(transB=1), 1 for MatMul's [K, N]), or per block of
    the reduction axis (`block_size`, opset 21; NVFP4's E4M3 block scales are themselves a
    DQ of an FP32 global scale, FLOAT4E2M1 weights at opset 23).
Nothing is placed on layer outputs. These are TensorRT's explicit-quantization rules
(BACKENDS.md); `lint.py` checks them on whatever is written.

Grid values are the ones the fake-quant model uses: LayerQuant.weight_integers (GPTQ's
choice, or ptqd.quant_math.quantize's nearest rounding) and quantize for activations. The fp8
configuration stores weights and Q outputs as FLOAT8E4M3FN (opset >= 19) in every flavour;
the float configuration (fp16) has no layers, so its graph is the FP graph. ONNX Runtime's
CPU-fast graph runs w4a16's Linear layers as com.microsoft::MatMulNBits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ptqd.calibration.configs import BitConfig
from ptqd.calibration.params import ConfigQuant, LayerQuant
from ptqd.exporter.graph_io import restore_weights, weightless
from ptqd.exporter.onnx_fp import denoiser_name, layer_nodes, node_kind
from ptqd.runtime.formats import TYPE_OPSET

INT4, INT8, FP8, FP4 = TensorProto.INT4, TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT4E2M1
# TensorRT's own ops (the parser's "trt" domain) and onnxruntime's contrib ops
TRT_DOMAIN, ORT_DOMAIN = "trt", "com.microsoft"


@dataclass(frozen=True)
class Storage:
    """How a configuration's grid values are stored in one graph flavour."""
    weight_int4: bool   # 4-bit weights of quantized-activation layers as INT4 (else in INT8)
    act_int4: bool      # 4-bit activations as INT4 Q/DQ (else Clip to the grid + INT8)
    quantize_outputs: bool = False  # Q/DQ on layer outputs too (8-bit, calibrated scale)
    fp4: bool = False   # FP4 as FLOAT4E2M1 with TensorRT's dynamic quantize (else in E4M3, standard ops)
    nbits: bool = False  # INT4 weight-only MatMul/Gemm as com.microsoft::MatMulNBits


# TensorRT runs INT4 only as weight-only blocked MatMul/Gemm with float activations; a
# W4A8 layer must keep its 8-bit activations, so its 4-bit weights are stored as INT8.
TENSORRT = Storage(weight_int4=False, act_int4=False, fp4=True)
# ONNX Runtime's reference: TensorRT's placement with INT4 storage, the exact twin of the
# fake-quant model (onnxruntime runs it, but dequantizes to float kernels).
ONNXRUNTIME = Storage(weight_int4=True, act_int4=True)
# ONNX Runtime's fast graph: onnxruntime fuses DQ -> Conv/MatMul/Gemm -> Q into
# QLinearConv/QLinearMatMul/QGemm only when the output is quantized, and those kernels take
# INT8 only; the output rounding (8 bits) is the price, measured by the benchmark. INT4
# weight-only layers run its 4-bit GEMM, MatMulNBits, with float inputs and outputs.
ONNXRUNTIME_FAST = Storage(weight_int4=False, act_int4=False, quantize_outputs=True, nbits=True)


def weight_axis(node, weight: np.ndarray) -> int:
    if node.op_type == "MatMul":
        return weight.ndim - 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 0  # Conv: [out, in, kh, kw]


def _zero_point(name: str, dtype: int, shape: tuple[int, ...]) -> onnx.TensorProto:
    return helper.make_tensor(name, dtype, shape, np.zeros(int(np.prod(shape)) if shape else 1,
                                                            dtype=np.int64).tolist())


def _int_tensor(name: str, values: np.ndarray, dtype: int) -> onnx.TensorProto:
    """Grid values (float or integer array) stored as INT8, INT4 (packed two a byte, low nibble
    first, in raw_data), FLOAT8E4M3FN or FLOAT4E2M1 (packed like INT4); the values are on the
    grid already, so every conversion here is exact."""
    import ml_dtypes  # onnx's own dependency: numpy's FP8, FP4 and INT4 types

    if dtype == INT8:
        return numpy_helper.from_array(values.astype(np.int8), name)
    if dtype == FP8:
        return numpy_helper.from_array(values.astype(np.float32).astype(ml_dtypes.float8_e4m3fn), name)
    if dtype == FP4:
        return numpy_helper.from_array(values.astype(np.float32).astype(ml_dtypes.float4_e2m1fn), name)
    return numpy_helper.from_array(values.astype(np.int8).astype(ml_dtypes.int4), name)


def storage_types(config: BitConfig, storage: Storage) -> tuple[int, int | None]:
    """(weight, activation) ONNX types of a layer's Q/DQ in one graph flavour; `config` is the
    layer's own (its kind's); activation None: weight-only."""
    names = config.format.onnx_types(config.weight_bits, config.act_bits, storage.weight_int4, storage.act_int4,
                                     fp4=storage.fp4)
    return tuple(None if name is None else getattr(TensorProto, name) for name in names)


class QDQInserter:
    """Works on a weightless view of the FP graph; the FP weights it quantizes are read from
    `source` (the FP graph itself)."""

    def __init__(self, model: onnx.ModelProto, storage: Storage, source: onnx.ModelProto):
        self.model = model
        self.storage = storage
        self.inits = {i.name: i for i in source.graph.initializer}
        self.new_nodes: dict[str, list] = {}   # consumer node name -> nodes to put before it
        self.after_nodes: dict[str, list] = {}  # producer node name -> nodes to put after it
        self.new_nodes_for_scale: list = []     # DQs of two-level weight scales
        self.dropped: set[str] = set()
        self.domains: dict[str, int] = {}       # opset domains the added ops need

    def activation(self, node, layer: str, lq: LayerQuant, config: BitConfig, dtype: int | None) -> None:
        """The layer's input quantized as `config` (the layer's own) says."""
        layout = config.act_layout
        if layout is None:      # weight-only: the input stays float
            return
        if layout.granularity == "dynamic-block":
            blocks = self.dynamic_blocks_trt if dtype == FP4 else self.dynamic_blocks_standard
            blocks(node, layer, float(lq.act_scale), layout.block, config.act_grid.qmax)
            return
        self.per_tensor(node, layer, float(lq.act_scale), config.act_bits, dtype)

    def per_tensor(self, node, layer: str, scale: float, bits: int, dtype: int) -> None:
        base = f"{layer}/input_quant"
        x = node.input[0]
        nodes = []
        if bits == 4 and dtype == INT8:
            # The 4-bit grid in INT8 storage: clip to [-8 s, 7 s] first; round-then-saturate
            # and clip-then-round give the same integers.
            lo, hi = self._const(f"{base}/clip_min", -8 * scale), self._const(f"{base}/clip_max", 7 * scale)
            nodes.append(helper.make_node("Clip", [x, lo, hi], [f"{base}/clipped"], name=f"{base}/Clip"))
            x = f"{base}/clipped"
        s = self._const(f"{base}/scale", scale)
        self._add(_zero_point(f"{base}/zero_point", dtype, ()))
        nodes.append(helper.make_node("QuantizeLinear", [x, s, f"{base}/zero_point"], [f"{base}/q"],
                                      name=f"{base}/QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{base}/q", s, f"{base}/zero_point"],
                                      [f"{base}/dq"], name=f"{base}/DequantizeLinear"))
        node.input[0] = f"{base}/dq"
        self.new_nodes.setdefault(node.name, []).extend(nodes)

    def dynamic_blocks_trt(self, node, layer: str, global_scale: float, block: int, top: float) -> None:
        """NVFP4 input as TensorRT quantizes it at run time: its dynamic quantize op gives FP4
        values and E4M3 block scales (under the calibrated FP32 global scale, which stays FP32
        as Model Optimizer writes it), then DQ of the scales and the blocked DQ."""
        base = f"{layer}/input_quant"
        g = self._const(f"{base}/global_scale", global_scale)
        nodes = [
            helper.make_node("TRT_FP4DynamicQuantize", [node.input[0], g], [f"{base}/q", f"{base}/block_scale_q"],
                             name=f"{base}/TRT_FP4DynamicQuantize", domain=TRT_DOMAIN, axis=-1, block_size=block,
                             scale_type=FP8),
            helper.make_node("DequantizeLinear", [f"{base}/block_scale_q", g], [f"{base}/block_scale"],
                             name=f"{base}/scale/DequantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{base}/q", f"{base}/block_scale"], [f"{base}/dq"],
                             name=f"{base}/DequantizeLinear", axis=-1, block_size=block)]
        node.input[0] = f"{base}/dq"
        self.domains[TRT_DOMAIN] = 1
        self.new_nodes.setdefault(node.name, []).extend(nodes)

    def dynamic_blocks_standard(self, node, layer: str, global_scale: float, block: int, top: float) -> None:
        """The same numbers in standard ops for ONNX Runtime (no FP4 kernels, no TensorRT op),
        op for op what quant_math.fake_quantize_dynamic and FP4Grid.round_ compute: blocks of
        the last axis, their maximum / 6 quantized to E4M3 under the global scale, the input
        divided by that scale (1 where it is 0) and rounded onto E2M1 by its spacing (0.5 below
        2, 1 below 4, else 2; half to even), multiplied back by it."""
        base = f"{layer}/input_quant"
        n = lambda op, inputs, out, **kw: helper.make_node(op, inputs, [f"{base}/{out}"], name=f"{base}/{out}/{op}", **kw)
        c = lambda name, value, dtype=np.float32: self._array(f"{base}/const/{name}", np.array(value, dtype=dtype))
        g = self._const(f"{base}/global_scale", global_scale)
        self._add(helper.make_tensor(f"{base}/zero_point", FP8, (), [0]))
        x = node.input[0]
        nodes = [
            n("Shape", [x], "shape"),
            n("Reshape", [x, c("blocks", [-1, block], np.int64)], "blocks"),
            n("Abs", [f"{base}/blocks"], "abs"),
            n("ReduceMax", [f"{base}/abs", c("axis", [1], np.int64)], "amax", keepdims=1),
            n("Div", [f"{base}/amax", c("top", top)], "amax_over_top"),
            n("QuantizeLinear", [f"{base}/amax_over_top", g, f"{base}/zero_point"], "block_scale_q"),
            n("DequantizeLinear", [f"{base}/block_scale_q", g, f"{base}/zero_point"], "block_scale_raw"),
            n("Equal", [f"{base}/block_scale_raw", c("zero", 0.0)], "empty"),
            n("Where", [f"{base}/empty", c("one", 1.0), f"{base}/block_scale_raw"], "block_scale"),
            n("Div", [f"{base}/blocks", f"{base}/block_scale"], "scaled"),
            n("Abs", [f"{base}/scaled"], "magnitude"),
            n("Min", [f"{base}/magnitude", c("grid_top", top)], "clipped"),
            n("Less", [f"{base}/clipped", c("two", 2.0)], "below_two"),
            n("Less", [f"{base}/clipped", c("four", 4.0)], "below_four"),
            n("Where", [f"{base}/below_four", c("step_one", 1.0), c("step_two", 2.0)], "upper_step"),
            n("Where", [f"{base}/below_two", c("step_half", 0.5), f"{base}/upper_step"], "step"),
            n("Div", [f"{base}/clipped", f"{base}/step"], "steps"),
            n("Round", [f"{base}/steps"], "rounded_steps"),
            n("Mul", [f"{base}/rounded_steps", f"{base}/step"], "rounded"),
            n("Sign", [f"{base}/scaled"], "sign"),
            n("Mul", [f"{base}/sign", f"{base}/rounded"], "grid_values"),
            # by the scale before its zero was made 1: a block whose scale rounds to 0 comes out 0
            n("Mul", [f"{base}/grid_values", f"{base}/block_scale_raw"], "dequantized"),
            n("Reshape", [f"{base}/dequantized", f"{base}/shape"], "dq")]
        node.input[0] = f"{base}/dq"
        self.new_nodes.setdefault(node.name, []).extend(nodes)

    def weight(self, node, layer: str, lq: LayerQuant, config: BitConfig, dtype: int) -> None:
        base = f"{layer}/weight_quant"
        w_name = node.input[1]
        w = numpy_helper.to_array(self.inits[w_name])
        axis = weight_axis(node, w)
        # the torch layout puts output channels first; MatMul's [K, N] (and Gemm without
        # transB) holds the same weight transposed
        torch_layout = torch.from_numpy(w.copy() if axis == 0 else w.T.copy())
        q = lq.weight_integers(torch_layout, config.weight_grid).numpy()
        q = q if axis == 0 else q.T
        layout = config.weight_layout
        self._add(_int_tensor(f"{base}/quantized", q, dtype))
        if layout.blocked:
            # blocks run along the reduction axis: the other one of a 2-D MatMul/Gemm weight
            block_axis = 1 - axis
            scale = self._block_scale(base, lq, transpose=axis == 1)
            dq = helper.make_node("DequantizeLinear", [f"{base}/quantized", scale], [f"{base}/dq"],
                                  name=f"{base}/DequantizeLinear", axis=block_axis, block_size=layout.block)
        else:
            scale = lq.weight_scale
            self._add(numpy_helper.from_array(scale.numpy().astype(np.float32), f"{base}/scale"))
            self._add(_zero_point(f"{base}/zero_point", dtype, (w.shape[axis],)))
            dq = helper.make_node("DequantizeLinear", [f"{base}/quantized", f"{base}/scale", f"{base}/zero_point"],
                                  [f"{base}/dq"], name=f"{base}/DequantizeLinear", axis=axis)
        node.input[1] = f"{base}/dq"
        self.dropped.add(w_name)
        self.new_nodes.setdefault(node.name, []).append(dq)

    def _block_scale(self, base: str, lq: LayerQuant, transpose: bool) -> str:
        """The blocked DQ's scale, laid out like the stored weight: FP32 scales, or (two-level)
        E4M3 block scales dequantized by the FP32 global scale in the graph, as TensorRT's
        NVFP4 weights are written."""
        scale = lq.weight_scale.numpy().astype(np.float32)
        scale = scale.T.copy() if transpose else scale
        if lq.weight_global is None:
            return self._array(f"{base}/scale", scale)
        self._add(_int_tensor(f"{base}/block_scale_q", scale, FP8))
        g = self._const(f"{base}/global_scale", float(lq.weight_global))
        self.new_nodes_for_scale.append(helper.make_node(
            "DequantizeLinear", [f"{base}/block_scale_q", g], [f"{base}/scale"], name=f"{base}/scale/DequantizeLinear"))
        return f"{base}/scale"

    def matmul_nbits(self, node, layer: str, lq: LayerQuant, config: BitConfig) -> None:
        """An INT4 weight-only MatMul/Gemm as onnxruntime's MatMulNBits: unsigned 4-bit values
        (the signed grid + 8, its default zero point) packed [N, blocks, block / 2] low nibble
        first, FP32 scales [N * blocks]; a Gemm's bias follows as an Add."""
        base = f"{layer}/weight_quant"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("alpha", 1.0), attrs.get("beta", 1.0), attrs.get("transA", 0)) != (1.0, 1.0, 0):
            raise ValueError(f"{node.name}: a Gemm with alpha, beta or transA set is no plain Linear layer")
        w = numpy_helper.to_array(self.inits[node.input[1]])
        axis = weight_axis(node, w)
        torch_layout = torch.from_numpy(w.copy() if axis == 0 else w.T.copy())   # [N, K]
        q = lq.weight_integers(torch_layout, config.weight_grid).numpy().astype(np.int16) + 8
        n_out, k = q.shape
        block = config.weight_layout.block
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n_out, k // block, block // 2)
        self._array(f"{base}/packed", packed)
        self._array(f"{base}/scale", lq.dequant_scale().numpy().astype(np.float32).reshape(-1))
        self.dropped.add(node.input[1])
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        x = node.input[0]
        del node.input[:]
        node.input.extend([x, f"{base}/packed", f"{base}/scale"])
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("K", k), helper.make_attribute("N", n_out),
                               helper.make_attribute("bits", 4), helper.make_attribute("block_size", block)])
        node.op_type, node.domain = "MatMulNBits", ORT_DOMAIN
        self.domains[ORT_DOMAIN] = 1
        if bias:
            y = node.output[0]
            node.output[0] = f"{base}/matmul"
            self.after_nodes.setdefault(node.name, []).append(
                helper.make_node("Add", [f"{base}/matmul", bias], [y], name=f"{base}/bias/Add"))

    def output(self, node, layer: str, scale: float) -> None:
        """Q -> DQ on the layer's output; consumers keep reading the original tensor name."""
        base = f"{layer}/output_quant"
        y = node.output[0]
        node.output[0] = f"{base}/float"
        s = self._const(f"{base}/scale", scale)
        self._add(_zero_point(f"{base}/zero_point", INT8, ()))
        self.after_nodes.setdefault(node.name, []).extend([
            helper.make_node("QuantizeLinear", [f"{base}/float", s, f"{base}/zero_point"], [f"{base}/q"],
                             name=f"{base}/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{base}/q", s, f"{base}/zero_point"], [y],
                             name=f"{base}/DequantizeLinear")])

    def _add(self, tensor: onnx.TensorProto) -> None:
        """Into the graph at once (copied into its message): a list of them, added at the end,
        would hold every quantized weight twice."""
        self.model.graph.initializer.append(tensor)

    def _const(self, name: str, value: float) -> str:
        return self._array(name, np.array(value, dtype=np.float32))

    def _array(self, name: str, value: np.ndarray) -> str:
        self._add(numpy_helper.from_array(value, name))
        return name

    def finish(self) -> onnx.ModelProto:
        graph = self.model.graph
        still_used = {i for n in graph.node for i in n.input}
        # the weight scales' own DQs (two-level scales) first: constants, needed by any layer
        ordered = list(self.new_nodes_for_scale)
        for node in graph.node:
            ordered.extend(self.new_nodes.get(node.name, []))
            ordered.append(node)
            ordered.extend(self.after_nodes.get(node.name, []))
        del graph.node[:]
        graph.node.extend(ordered)
        # the weights the Q/DQ pairs replaced leave (stubs of the weightless view); the order is
        # the graph's, then the added ones in the order they were made
        for index in reversed(range(len(graph.initializer))):
            name = graph.initializer[index].name
            if name in self.dropped and name not in still_used:
                del graph.initializer[index]
        for domain, version in self.domains.items():
            if all(o.domain != domain for o in self.model.opset_import):
                self.model.opset_import.add(domain=domain, version=version)
        return self.model

    def require_opset(self, version: int) -> None:
        """Raise the default domain's opset to `version` (FLOAT4E2M1 needs 23; the exported
        ops mean the same there)."""
        for opset in self.model.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version < version:
                opset.version = version


def insert_qdq(fp_model: onnx.ModelProto, quant: ConfigQuant, storage: Storage) -> onnx.ModelProto:
    """A QDQ copy of the FP graph for one configuration; every calibrated layer must be found.
    Built on the FP graph's weightless view: the FP weights the copy keeps (biases, norms,
    layers kept in float) are copied in at the end, the quantized layers' never are, so a copy
    costs its own weights, not another FP graph's (SDXL's UNet is 10 GB in FP32)."""
    model = weightless(fp_model)
    nodes = layer_nodes(model)
    missing = sorted(set(quant.layers) - set(nodes))
    if missing:
        raise ValueError(f"calibrated layers not found in the ONNX graph: {', '.join(missing[:5])}")
    inserter = QDQInserter(model, storage, fp_model)
    # the float engine (fp16) has no quantized layer: its copy is the FP graph, renamed
    for layer, lq in sorted(quant.layers.items()):
        node = nodes[layer]
        config = quant.config.for_kind(node_kind(node))
        weight_type, act_type = storage_types(config, storage)
        if act_type is None and storage.nbits:
            inserter.matmul_nbits(node, layer, lq, config)
            continue
        if FP4 in (weight_type, act_type):
            inserter.require_opset(TYPE_OPSET["FLOAT4E2M1"])
        inserter.activation(node, layer, lq, config, act_type)
        inserter.weight(node, layer, lq, config, weight_type)
        if storage.quantize_outputs and act_type is not None and config.act_layout.granularity == "tensor":
            if lq.output_scale is None:
                raise ValueError(f"{layer} has no output scale: recalibrate with this version")
            inserter.output(node, layer, float(lq.output_scale))
    model = inserter.finish()
    restore_weights(model, fp_model)
    model.graph.name = f"{denoiser_name(fp_model)}_{quant.config.name}"
    return model
