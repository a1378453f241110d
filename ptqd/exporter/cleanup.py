"""Constant folding and shape cleanup of the TensorRT graphs, by onnx-graphsurgeon.

The TorchScript exporter leaves hundreds of Constant nodes and a Shape -> Gather -> Unsqueeze
-> Concat chain wherever the model reads a tensor's size; demoDiffusion folds these before
building. onnx-graphsurgeon's fold_constants evaluates the constant subgraphs in onnxruntime,
folds Shape nodes of statically known dimensions (given ONNX's shape inference with data
propagation), and never folds QuantizeLinear/DequantizeLinear, so the Q/DQ structure the lint
checks is left as it is. What still depends on the dynamic batch axis (the full Shape a
GroupNorm reshapes back to) stays.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx

from ptqd.exporter.graph_io import is_stripped, restore_weights, weightless

# Each pass can expose new static shapes to the next (a folded Reshape target types the
# tensors after it); two passes reach the fixed point on the UNets seen here, the cap is a guard.
MAX_PASSES = 4


@dataclass(frozen=True)
class NodeCounts:
    total: int
    constant: int
    shape: int

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "NodeCounts":
        ops = Counter(n.op_type for n in model.graph.node)
        return cls(len(model.graph.node), ops["Constant"], ops["Shape"])

    def __str__(self) -> str:
        return f"{self.total} nodes, {self.constant} Constant, {self.shape} Shape"


def _one_pass(view: onnx.ModelProto) -> onnx.ModelProto:
    """One folding pass over a weightless view (shape inference serializes the model: a UNet
    past 2 GiB would not), giving a weightless view. A node computing from a weight is left as
    it is (the TorchScript exporter has folded those already, Q/DQ are never folded):
    evaluating it would need the payload."""
    import onnx_graphsurgeon as gs

    stripped = {t.name for t in view.graph.initializer if is_stripped(t)}
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(view, data_prop=True))
    graph.toposort()
    reads_weight = lambda node: any(t.name in stripped for t in node.inputs)
    graph.fold_constants(error_ok=False, should_exclude_node=reads_weight).cleanup().toposort()
    folded = gs.export_onnx(graph)
    # shape inference's value_info is not part of the graph's contract; writers re-infer
    del folded.graph.value_info[:]
    return folded


def fold_and_clean(model: onnx.ModelProto) -> tuple[onnx.ModelProto, NodeCounts, NodeCounts]:
    """(folded model, counts before, counts after); metadata, opsets and names kept."""
    import onnxruntime as ort
    from onnx_graphsurgeon.logger import G_LOGGER

    before = NodeCounts.of(model)
    quiet = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    ort.set_default_logger_severity(3)  # its graph optimizer's warnings about the folding sessions
    try:
        # every pass on the weightless view; the weights go in once, from `model`, at the end
        current, counts = weightless(model), before
        for _ in range(MAX_PASSES):
            current = _one_pass(current)
            if NodeCounts.of(current) == counts:
                break
            counts = NodeCounts.of(current)
    finally:
        G_LOGGER.severity = quiet
    restore_weights(current, model)
    current.graph.name = model.graph.name
    del current.metadata_props[:]
    current.metadata_props.extend(model.metadata_props)
    current.ir_version = model.ir_version
    return current, before, NodeCounts.of(current)
