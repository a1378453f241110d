"""The TensorRT graphs are FP16 inside with a float32 interface, folded and cleaned; the ONNX
Runtime graphs are untouched. The FP16 pass and the folding on their own, then on export-trt's
output."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqd.exporter.cleanup import fold_and_clean
from ptqd.exporter.fp16 import convert_to_fp16, fp32_exceptions, fp32_slot, input_path
from ptqd.exporter.lint import lint_model

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _small_graph(opset=21, weight_scale=1.0):
    """sample -> Q/DQ -> Conv(DQ(W)) -> InstanceNorm -> Resize x2 -> + sin(timestep * f) -> out."""
    rng = np.random.default_rng(0)
    f32 = lambda a, n: numpy_helper.from_array(np.asarray(a, np.float32), n)
    inits = [f32(0.05, "a_scale"), helper.make_tensor("a_zp", TensorProto.INT8, (), [0]),
             numpy_helper.from_array(rng.integers(-8, 8, (4, 2, 3, 3)).astype(np.int8), "w_q"),
             f32(np.full(4, 0.02 * weight_scale), "w_scale"), f32(rng.standard_normal(4), "bias"),
             f32(np.ones(4), "gamma"), f32(np.zeros(4), "beta"), f32([1, 1, 2, 2], "scales"),
             f32([1.0, 0.1, 0.37, 0.0123], "freq")]
    nodes = [
        helper.make_node("QuantizeLinear", ["sample", "a_scale", "a_zp"], ["xq"], name="act_q"),
        helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zp"], ["xdq"], name="act_dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="w_dq", axis=0),
        helper.make_node("Conv", ["xdq", "w", "bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("InstanceNormalization", ["c", "gamma", "beta"], ["n"], name="norm"),
        helper.make_node("Resize", ["n", "", "scales"], ["r"], name="resize", mode="nearest"),
        helper.make_node("Unsqueeze", ["timestep", "axes"], ["t2"], name="t_unsq"),
        helper.make_node("Mul", ["t2", "freq"], ["arg"], name="t_mul"),
        helper.make_node("Sin", ["arg"], ["emb"], name="t_sin"),
        helper.make_node("Unsqueeze", ["emb", "axes23"], ["emb4"], name="emb_unsq"),
        helper.make_node("Add", ["r", "emb4"], ["noise_pred"], name="add"),
    ]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "axes"),
              numpy_helper.from_array(np.array([2, 3], np.int64), "axes23")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("sample", FLOAT, ["N", 2, 8, 8]),
                                           helper.make_tensor_value_info("timestep", FLOAT, ["N"])],
                              [helper.make_tensor_value_info("noise_pred", FLOAT, ["N", 4, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, x, t):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"sample": x, "timestep": t})[0]


def _inputs():
    rng = np.random.default_rng(1)
    return rng.standard_normal((3, 2, 8, 8)).astype(np.float32), np.array([999.0, 500.0, 1.0], np.float32)


def _io_casts(model):
    """Per graph input / output: the ops that read it / the op that writes it."""
    g = model.graph
    readers = {i.name: [n.op_type for n in g.node if i.name in n.input] for i in g.input}
    writers = {o.name: [n.op_type for n in g.node if o.name in n.output] for o in g.output}
    return readers, writers


def test_every_float_tensor_is_fp16_behind_one_cast_each_way():
    model = _small_graph()
    half = convert_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    floats = {i.name: i.data_type for i in half.graph.initializer if i.data_type in (FLOAT, FLOAT16)}
    # Resize's scales are float32 by ONNX's definition; everything else is FP16, scales included
    assert {n for n, t in floats.items() if t == FLOAT} == {"scales"}
    assert floats["a_scale"] == floats["w_scale"] == floats["gamma"] == floats["freq"] == FLOAT16
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [FLOAT, FLOAT]
    assert half.graph.output[0].type.tensor_type.elem_type == FLOAT
    assert _io_casts(half) == ({"sample": ["Cast"], "timestep": ["Cast"]}, {"noise_pred": ["Cast"]})
    assert lint_model(half) == [] and lint_model(model) != []
    x, t = _inputs()
    ref, got = _run(model, x, t), _run(half, x, t)
    assert got.dtype == np.float32 and got.shape == ref.shape
    # FP16 keeps 11 significant bits, ~1e-3 relative on O(1) values, but the sinusoid's
    # argument 999 * 0.37 is rounded to FP16's spacing there (0.25) before the sine: measured
    # 0.071 max, 0.013 mean, nearly all from the timestep path (next test)
    assert np.abs(got - ref).max() < 0.1 and np.abs(got - ref).mean() < 0.02


def test_kept_nodes_stay_fp32_behind_casts_and_are_declared():
    model = _small_graph()
    keep = {n: "sinusoid argument up to ~1000" for n in input_path(model, "timestep")}
    assert set(keep) == {"t_unsq", "t_mul", "t_sin", "emb_unsq"}
    half = convert_to_fp16(model, keep)
    onnx.checker.check_model(half, full_check=True)
    assert fp32_exceptions(half) == keep
    types = {i.name: i.data_type for i in half.graph.initializer}
    assert types["freq"] == FLOAT and types["gamma"] == FLOAT16
    assert lint_model(half) == []
    stripped = onnx.ModelProto()
    stripped.CopyFrom(half)
    del stripped.metadata_props[:]
    assert {v.node for v in lint_model(stripped)} == {"t_mul", "t_sin", "t_unsq", "emb_unsq"}
    x, t = _inputs()
    ref, got, all_fp16 = _run(model, x, t), _run(half, x, t), _run(convert_to_fp16(model), x, t)
    # the sinusoid in FP32 leaves FP16's rounding of O(1) values: measured 5.2e-4 mean against
    # 1.3e-2 with the sinusoid in FP16
    assert np.abs(got - ref).mean() < 0.1 * np.abs(all_fp16 - ref).mean()


@pytest.mark.parametrize("kwargs, message", [({"opset": 17}, "opset >= 19"),
                                             ({"weight_scale": 1e7}, "beyond FP16's range")])
def test_graphs_fp16_cannot_hold_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert_to_fp16(_small_graph(**kwargs))
    with pytest.raises(ValueError, match="lacks"):
        convert_to_fp16(_small_graph(), {"no_such_node": "x"})


def test_resize_scales_are_the_only_fp32_slot():
    assert fp32_slot("Resize", 2) and not fp32_slot("Resize", 0) and not fp32_slot("Conv", 1)


# --- on export-trt's output ---------------------------------------------------------------

def _trt_graphs(exported):
    return sorted(p for p in (exported / "onnx").glob("unet_w*.onnx") if p.name.count(".") == 1)


def test_exported_tensorrt_graphs_have_no_fp32_compute_and_float32_io(exported):
    graphs = _trt_graphs(exported)
    assert [p.name for p in graphs] == ["unet_w4a8.onnx", "unet_w8a8.onnx"]
    plan = json.loads((exported / "onnx" / "precision_plan.json").read_text())
    for path in graphs:
        model = onnx.load(str(path))
        assert [v for v in lint_model(model) if v.rule == "fp32-compute"] == [], path.name
        readers, writers = _io_casts(model)
        assert readers == {"sample": ["Cast"], "timestep": ["Cast"]} and writers == {"noise_pred": ["Cast"]}
        assert all(v.type.tensor_type.elem_type == FLOAT for v in (*model.graph.input, *model.graph.output))
        inits = {i.name: i.data_type for i in model.graph.initializer}
        assert sum(t == FLOAT16 for t in inits.values()) > 100
        resize_scales = {n.input[2] for n in model.graph.node if n.op_type == "Resize"}
        assert {n for n, t in inits.items() if t == FLOAT} == resize_scales
        cfg = path.name.split("_")[1].split(".")[0]
        declared = plan["configs"][cfg]["tensorrt_float"]["fp32_exceptions"]
        assert {e["node"]: e["reason"] for e in declared} == fp32_exceptions(model)


def test_onnxruntime_graphs_stay_fp32_and_as_insert_qdq_writes_them(exported):
    """The reference and CPU-fast graphs are insert_qdq's output, byte for byte."""
    from ptqd.calibration.params import load_params
    from ptqd.exporter.qdq import ONNXRUNTIME, ONNXRUNTIME_FAST, insert_qdq

    params = load_params(exported / "calibration")
    fp_model = onnx.load(str(exported / "onnx" / "unet_fp32.onnx"))
    for cfg in params:
        for suffix, storage in ((".ort.onnx", ONNXRUNTIME), (".cpu.onnx", ONNXRUNTIME_FAST)):
            path = exported / "onnx" / f"unet_{cfg}{suffix}"
            assert path.read_bytes() == insert_qdq(fp_model, params[cfg], storage).SerializeToString(), path.name
            assert FLOAT16 not in {i.data_type for i in onnx.load(str(path)).graph.initializer}


def test_folding_changes_neither_numerics_nor_lint_and_is_logged(exported):
    from ptqd.calibration.params import load_params
    from ptqd.exporter.qdq import TENSORRT, insert_qdq

    qdq = insert_qdq(onnx.load(str(exported / "onnx" / "unet_fp32.onnx")),
                     load_params(exported / "calibration")["w4a8"], TENSORRT)
    folded, before, after = fold_and_clean(qdq)
    assert after.constant == 0 and after.shape < before.shape and after.total < before.total
    qdq_rules = lambda m: sorted(str(v) for v in lint_model(m) if v.rule != "fp32-compute")
    assert qdq_rules(folded) == qdq_rules(qdq) == []
    ops = lambda m: sorted(n.op_type for n in m.graph.node if "Quantize" in n.op_type)
    assert ops(folded) == ops(qdq)
    gen = np.random.default_rng(3)
    x, t = gen.standard_normal((4, 1, 16, 16)).astype(np.float32), np.array([999.0, 600.0, 20.0, 1.0], np.float32)
    # measured: bit-identical (the folded subgraphs are shape arithmetic and exact constants)
    assert np.abs(_run(folded, x, t) - _run(qdq, x, t)).max() <= 1e-6
    assert lint_model(convert_to_fp16(folded)) == [] and lint_model(convert_to_fp16(qdq)) == []
    log = (exported.parent / "export-trt.log").read_text()
    assert f"[export] unet_w4a8.onnx: folded {before} -> {after}" in log

