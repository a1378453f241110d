"""`ptqd lint` catches each planted violation of TensorRT's QDQ rules, and passes clean graphs."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqd.exporter.lint import RULES, lint_model
from tests.conftest import run_cli


def _graph(*, zp=0, act_scale=(0.1,), w_axis=0, w_int4=False, act_int4=False, computed_scale=False,
           shared_dq=False, qdq_before_add=False, matmul_int4_block=None, opset=21, neg_scale=False,
           fp32=False, act_fp8=False, w_fp8=False):
    """x -> Q/DQ -> Conv(DQ(W)) -> y, plus a MatMul branch, with one rule broken at a time; FP16
    throughout (what the exporter gives TensorRT), or FP32 with fp32=True."""
    inits, nodes = [], []
    ftype, fdtype = (TensorProto.FLOAT, np.float32) if fp32 else (TensorProto.FLOAT16, np.float16)
    a_type = TensorProto.INT4 if act_int4 else TensorProto.FLOAT8E4M3FN if act_fp8 else TensorProto.INT8
    scale = np.array(act_scale, dtype=fdtype).reshape(() if len(act_scale) == 1 else (-1,))
    if neg_scale:
        scale = -scale
    inits.append(numpy_helper.from_array(scale, "a_scale"))
    inits.append(helper.make_tensor("a_zp", a_type, scale.shape, [zp] * scale.size))
    scale_name = "a_scale"
    if computed_scale:
        nodes.append(helper.make_node("Mul", ["a_scale", "a_scale"], ["a_scale2"], name="scale_mul"))
        scale_name = "a_scale2"
    nodes += [helper.make_node("QuantizeLinear", ["x", scale_name, "a_zp"], ["xq"], name="act_q"),
              helper.make_node("DequantizeLinear", ["xq", scale_name, "a_zp"], ["xdq"], name="act_dq")]
    w_type = TensorProto.INT4 if w_int4 else TensorProto.FLOAT8E4M3FN if w_fp8 else TensorProto.INT8
    inits.append(helper.make_tensor("w", w_type, (4, 3, 3, 3), [1] * 108))
    inits.append(numpy_helper.from_array(np.full(4 if w_axis == 0 else 3, 0.01, fdtype), "w_scale"))
    inits.append(helper.make_tensor("w_zp", w_type, (4 if w_axis == 0 else 3,), [0] * (4 if w_axis == 0 else 3)))
    nodes.append(helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wdq"], name="w_dq", axis=w_axis))
    nodes.append(helper.make_node("Conv", ["xdq", "wdq"], ["y"], name="conv", pads=[1, 1, 1, 1]))
    outputs = [helper.make_tensor_value_info("y", ftype, None)]
    if shared_dq:
        inits.append(numpy_helper.from_array(np.ones((4, 3, 3, 3), fdtype), "w2"))
        nodes.append(helper.make_node("Conv", ["xdq", "w2"], ["y2"], name="conv2", pads=[1, 1, 1, 1]))
        outputs.append(helper.make_tensor_value_info("y2", ftype, None))
    if qdq_before_add:
        nodes.append(helper.make_node("Add", ["xdq", "x"], ["sum"], name="add"))
        outputs.append(helper.make_tensor_value_info("sum", ftype, None))
    # MatMul branch: [.., 8] x [8, 128] with an INT4 or INT8 weight
    m_type = TensorProto.INT4 if matmul_int4_block is not None else TensorProto.INT8
    inits.append(helper.make_tensor("m", m_type, (128, 8), [1] * 1024))
    block = matmul_int4_block or 0
    m_scale_shape = (128 // block, 8) if block else (8,)
    inits.append(numpy_helper.from_array(np.full(m_scale_shape, 0.01, fdtype), "m_scale"))
    dq_attrs = {"axis": 0, "block_size": block} if block else {"axis": 1}
    nodes.append(helper.make_node("DequantizeLinear", ["m", "m_scale"], ["mdq"], name="m_dq", **dq_attrs))
    nodes.append(helper.make_node("MatMul", ["t", "mdq"], ["z"], name="matmul"))
    outputs.append(helper.make_tensor_value_info("z", ftype, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", ftype, [1, 3, 8, 8]),
                                           helper.make_tensor_value_info("t", ftype, [2, 128])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _rules(model, target="tensorrt"):
    return {(v.node, v.rule) for v in lint_model(model, target)}


def test_a_clean_graph_passes_and_runs():
    import onnxruntime as ort

    model = _graph()
    assert _rules(model) == set()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sess.run(None, {"x": np.ones((1, 3, 8, 8), np.float16), "t": np.ones((2, 128), np.float16)})


def test_a_clean_fp8_graph_passes_and_runs():
    import onnxruntime as ort

    model = _graph(act_fp8=True, w_fp8=True)
    assert _rules(model) == set()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(["y"], {"x": np.ones((1, 3, 8, 8), np.float16), "t": np.ones((2, 128), np.float16)})[0]
    # the centre pixel: 27 inputs of 1.0 times weights of 0.01, all exact in E4M3 and FP16
    assert abs(float(y[0, 0, 4, 4]) - 0.27) < 1e-3


@pytest.mark.parametrize("kwargs, expected", [
    ({"zp": 3}, {("act_q", "zero-point"), ("act_dq", "zero-point")}),
    ({"computed_scale": True}, {("act_q", "scale-constant"), ("act_dq", "scale-constant")}),
    ({"neg_scale": True}, {("act_q", "scale-positive"), ("act_dq", "scale-positive")}),
    ({"act_scale": (0.1, 0.2, 0.3)}, {("act_q", "activation-per-tensor")}),
    ({"w_axis": 1}, {("w_dq", "weight-axis")}),
    ({"shared_dq": True}, {("act_dq", "dedicated-pair")}),
    ({"qdq_before_add": True}, {("act_dq", "dedicated-pair"), ("act_dq", "placement")}),
    ({"act_int4": True}, {("act_q", "int4-activation")}),
    ({"w_int4": True}, {("w_dq", "int4-conv")}),
    ({"matmul_int4_block": 32}, {("m_dq", "int4-blocked")}),
    ({"opset": 13, "matmul_int4_block": 64}, {("m_dq", "opset")}),
    ({"act_fp8": True}, {("w_dq", "fp8-int8-mix")}),
    ({"w_fp8": True}, {("w_dq", "fp8-int8-mix")}),
    ({"act_fp8": True, "w_fp8": True, "opset": 18}, {("act_q", "opset"), ("act_dq", "opset"), ("w_dq", "opset")}),
])
def test_each_planted_violation_is_named(kwargs, expected):
    found = _rules(_graph(**kwargs))
    assert expected <= found, found
    assert {r for _, r in found} <= set(RULES)


def test_each_fp32_compute_node_is_one_line_and_named_exceptions_are_not():
    """TensorRT builds strongly typed, so an FP32 graph would run FP32 kernels: every node
    touching an FP32 tensor (Q, DQ, Conv, MatMul here) is reported once; a node the graph's
    metadata names as an FP32 exception is not; ONNX Runtime's target has no such rule."""
    from ptqd.exporter.fp16 import EXCEPTIONS_KEY

    model = _graph(fp32=True)
    violations = [v for v in lint_model(model) if v.rule == "fp32-compute"]
    assert sorted(v.node for v in violations) == ["act_dq", "act_q", "conv", "m_dq", "matmul", "w_dq"]
    assert "Conv on FP32" in next(str(v) for v in violations if v.node == "conv")
    model.metadata_props.add(key=EXCEPTIONS_KEY, value='{"conv": "measured: needs FP32"}')
    assert "conv" not in {v.node for v in lint_model(model)}
    assert _rules(model, "onnxruntime") == set()


def test_casts_at_the_io_boundary_are_not_compute():
    """float32 in -> Cast -> FP16 graph -> Cast -> float32 out: the exporter's TensorRT interface."""
    model = _graph()
    graph = model.graph
    for value, cast_in in ((graph.input[0], True), (graph.output[0], False)):
        name = value.name
        value.type.tensor_type.elem_type = TensorProto.FLOAT
        if cast_in:
            node = helper.make_node("Cast", [name], [name + "16"], name="in_cast", to=TensorProto.FLOAT16)
            graph.node[0].input[0] = name + "16"
            graph.node.insert(0, node)
        else:
            conv = next(n for n in graph.node if n.op_type == "Conv")
            conv.output[0] = name + "16"
            graph.node.append(helper.make_node("Cast", [name + "16"], [name], name="out_cast", to=TensorProto.FLOAT))
    assert _rules(model) == set()


def test_blocked_int4_matmul_is_allowed():
    assert _rules(_graph(matmul_int4_block=64)) == set()


def test_onnxruntime_target_allows_int4_convolutions():
    model = _graph(w_int4=True)
    assert ("w_dq", "int4-conv") in _rules(model, "tensorrt")
    assert _rules(model, "onnxruntime") == set()


def test_lint_command_names_node_and_rule(tmp_path):
    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    onnx.save(_graph(zp=1), str(bad))
    onnx.save(_graph(), str(good))
    result = run_cli("lint", str(bad), str(good))
    assert result.returncode == 1
    assert "act_q: [zero-point]" in result.stdout and "good.onnx: clean" in result.stdout
    assert run_cli("lint", str(good)).returncode == 0


def test_a_zero_point_made_by_a_constant_node_is_typed_like_an_initializer():
    """`ptqd lint` reads graphs it did not write: an FP8 zero point from a Constant node at
    opset 18 is the same opset violation as one stored as an initializer, once per node."""
    model = _graph(act_fp8=True, w_fp8=True, opset=18)
    zp = next(i for i in model.graph.initializer if i.name == "a_zp")
    model.graph.initializer.remove(zp)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["a_zp"], name="a_zp_const", value=zp))
    violations = [(v.node, v.rule) for v in lint_model(model) if v.rule == "opset"]
    assert sorted(violations) == [("act_dq", "opset"), ("act_q", "opset"), ("w_dq", "opset")]
