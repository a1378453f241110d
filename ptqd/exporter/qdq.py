"""QuantizeLinear/DequantizeLinear insertion into the full-precision ONNX graph.

The graph is not re-traced from the fake-quant model: each calibrated layer is found in the
FP graph by name (onnx_fp.layer_nodes) and given
  - on its activation input, a dedicated Q -> DQ pair (per tensor, zero point 0);
  - its weight replaced by an integer initializer -> DQ (per output channel on the
    consumer's axis: 0 for Conv and Gemm(transB=1), 1 for MatMul's [K, N]).
Nothing is placed on layer outputs. These are TensorRT's explicit-quantization rules
(BACKENDS.md); `lint.py` checks them on whatever is written.

Integer values are the ones the fake-quant model uses: LayerQuant.weight_integers (GPTQ's
choice, or ptqd.quant_math.quantize's nearest rounding) and quantize for activations.
The fp8 configuration stores weights and Q outputs as FLOAT8E4M3FN (opset >= 19) in every
flavour; the float configuration (fp16) has no layers, so its graph is the FP graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ptqd.calibration.params import ConfigQuant, LayerQuant
from ptqd.exporter.graph_io import restore_weights, weightless
from ptqd.exporter.onnx_fp import denoiser_name, layer_nodes

INT4, INT8, FP8 = TensorProto.INT4, TensorProto.INT8, TensorProto.FLOAT8E4M3FN


@dataclass(frozen=True)
class Storage:
    """How a configuration's integers are stored in one graph flavour."""
    weight_int4: bool   # 4-bit weights as INT4 (else the 4-bit grid in INT8)
    act_int4: bool      # 4-bit activations as INT4 Q/DQ (else Clip to the grid + INT8)
    quantize_outputs: bool = False  # Q/DQ on layer outputs too (8-bit, calibrated scale)


# TensorRT runs INT4 only as weight-only blocked MatMul/Gemm with float activations; a
# W4A8 layer must keep its 8-bit activations, so its 4-bit weights are stored as INT8.
TENSORRT = Storage(weight_int4=False, act_int4=False)
# ONNX Runtime's reference: TensorRT's placement with INT4 storage, the exact twin of the
# fake-quant model (onnxruntime runs it, but dequantizes to float kernels).
ONNXRUNTIME = Storage(weight_int4=True, act_int4=True)
# ONNX Runtime's fast graph: onnxruntime fuses DQ -> Conv/MatMul/Gemm -> Q into
# QLinearConv/QLinearMatMul/QGemm only when the output is quantized, and those kernels take
# INT8 only; the output rounding (8 bits) is the price, measured by the benchmark.
ONNXRUNTIME_FAST = Storage(weight_int4=False, act_int4=False, quantize_outputs=True)


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
    first, in raw_data) or FLOAT8E4M3FN; the values are on the grid already, so every
    conversion here is exact."""
    import ml_dtypes  # onnx's own dependency: numpy's FP8 and INT4 types

    if dtype == INT8:
        return numpy_helper.from_array(values.astype(np.int8), name)
    if dtype == FP8:
        return numpy_helper.from_array(values.astype(np.float32).astype(ml_dtypes.float8_e4m3fn), name)
    return numpy_helper.from_array(values.astype(np.int8).astype(ml_dtypes.int4), name)


def storage_types(quant: ConfigQuant, storage: Storage) -> tuple[int, int]:
    """(weight, activation) ONNX types of one configuration's Q/DQ in one graph flavour."""
    config = quant.config
    names = config.format.onnx_types(config.weight_bits, config.act_bits, storage.weight_int4, storage.act_int4)
    return tuple(getattr(TensorProto, name) for name in names)


class QDQInserter:
    """Works on a weightless view of the FP graph; the FP weights it quantizes are read from
    `source` (the FP graph itself)."""

    def __init__(self, model: onnx.ModelProto, storage: Storage, source: onnx.ModelProto):
        self.model = model
        self.storage = storage
        self.inits = {i.name: i for i in source.graph.initializer}
        self.new_nodes: dict[str, list] = {}   # consumer node name -> nodes to put before it
        self.after_nodes: dict[str, list] = {}  # producer node name -> nodes to put after it
        self.dropped: set[str] = set()

    def activation(self, node, layer: str, scale: float, bits: int, dtype: int) -> None:
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

    def weight(self, node, layer: str, lq: LayerQuant, grid, dtype: int) -> None:
        base = f"{layer}/weight_quant"
        w_name = node.input[1]
        w = numpy_helper.to_array(self.inits[w_name])
        axis = weight_axis(node, w)
        # the torch layout puts output channels first; MatMul's [K, N] (and Gemm without
        # transB) holds the same weight transposed
        torch_layout = torch.from_numpy(w.copy() if axis == 0 else w.T.copy())
        q = lq.weight_integers(torch_layout, grid).numpy()
        q = q if axis == 0 else q.T
        scale = lq.weight_scale
        self._add(_int_tensor(f"{base}/quantized", q, dtype))
        self._add(numpy_helper.from_array(scale.numpy().astype(np.float32), f"{base}/scale"))
        self._add(_zero_point(f"{base}/zero_point", dtype, (w.shape[axis],)))
        dq = helper.make_node("DequantizeLinear", [f"{base}/quantized", f"{base}/scale", f"{base}/zero_point"],
                              [f"{base}/dq"], name=f"{base}/DequantizeLinear", axis=axis)
        node.input[1] = f"{base}/dq"
        self.dropped.add(w_name)
        self.new_nodes.setdefault(node.name, []).append(dq)

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
        self._add(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    def finish(self) -> onnx.ModelProto:
        graph = self.model.graph
        still_used = {i for n in graph.node for i in n.input}
        ordered = []
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
        return self.model


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
    weight_type, act_type = storage_types(quant, storage) if quant.config.quantized else (None, None)
    for layer, lq in sorted(quant.layers.items()):
        node = nodes[layer]
        inserter.activation(node, layer, float(lq.act_scale), quant.config.act_bits, act_type)
        inserter.weight(node, layer, lq, quant.config.weight_grid, weight_type)
        if storage.quantize_outputs:
            if lq.output_scale is None:
                raise ValueError(f"{layer} has no output scale: recalibrate with this version")
            inserter.output(node, layer, float(lq.output_scale))
    model = inserter.finish()
    restore_weights(model, fp_model)
    model.graph.name = f"{denoiser_name(fp_model)}_{quant.config.name}"
    return model
