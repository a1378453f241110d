"""The weightless view the in-memory graph passes (shape inference, folding, FP16 typing, the
lint) run on, so that a UNet past protobuf's 2 GiB never has to be serialized whole."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqd.exporter.cleanup import fold_and_clean
from ptqd.exporter.fp16 import convert_to_fp16
from ptqd.exporter.graph_io import INLINE_BELOW, is_stripped, restore_weights, weightless
from ptqd.exporter.lint import lint_model


def _model() -> onnx.ModelProto:
    """x -> MatMul(W, 64x64) -> Reshape(shape computed from constants) -> y"""
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Constant", [], ["two"], name="c", value=numpy_helper.from_array(np.array([2], np.int64))),
             helper.make_node("Concat", ["two", "minus_one"], ["shape"], name="cat", axis=0),
             helper.make_node("Reshape", ["h", "shape"], ["y"], name="r")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1], np.int64),
                                                                                         "minus_one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_weightless_view_holds_no_weight_and_gives_every_byte_back(tmp_path):
    onnx.save_model(_model(), str(tmp_path / "m.onnx"))
    model = onnx.load(str(tmp_path / "m.onnx"))  # as the exporter reads a graph (data_location spelled out)
    before = model.SerializeToString()
    view = weightless(model)
    # the 16 KB weight is stripped; the 8-byte shape tensor stays inside
    assert [t.name for t in view.graph.initializer if is_stripped(t)] == ["w"]
    assert view.ByteSize() < INLINE_BELOW
    with pytest.raises(Exception):  # a pass that did read a weight would fail, not see zeros
        numpy_helper.to_array(view.graph.initializer[0])
    assert model.SerializeToString() == before   # the model itself is not touched
    restore_weights(view, model)
    assert view.SerializeToString() == before


def test_passes_on_the_weightless_view_keep_the_weights():
    model = _model()
    w = numpy_helper.to_array(model.graph.initializer[0])
    folded, before, after = fold_and_clean(model)
    assert (before.constant, after.constant) == (1, 0)  # the Constant/Concat folded, the weight untouched
    assert np.array_equal(numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == "w")), w)
    half = convert_to_fp16(folded)
    assert np.array_equal(numpy_helper.to_array(next(i for i in half.graph.initializer if i.name == "w")),
                          w.astype(np.float16))
    assert lint_model(half, "tensorrt") == []


def test_a_weight_lost_in_a_pass_is_an_error():
    lost = weightless(_model())
    with pytest.raises(RuntimeError, match="lost its weights"):
        restore_weights(lost, onnx.ModelProto())


def test_a_graph_torch_wrote_past_2_gib_is_streamed_into_one_data_file(tmp_path):
    """Past 2 GiB torch.onnx writes one file per tensor; export_torch gathers them into
    `<graph>.data` a tensor at a time, small tensors back inside the graph, and the graph
    computes what it did."""
    import onnxruntime as ort

    from ptqd.exporter.graph_io import export_torch
    from ptqd.runtime.layout import external_data_path

    def export(file):   # what torch does for a large model: every initializer in a file of its own
        onnx.save_model(_model(), str(file), save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=0)

    path = tmp_path / "g.onnx"
    export_torch(export, path)
    graph = onnx.load(str(path), load_external_data=False)
    external = {t.name for t in graph.graph.initializer if t.external_data}
    assert external == {"w"} and external_data_path(path).stat().st_size == 64 * 64 * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]   # no scratch left
    x = np.ones((3, 64), np.float32)
    run = lambda model_path: ort.InferenceSession(str(model_path)).run(None, {"x": x})[0]
    onnx.save_model(_model(), str(tmp_path / "ref.onnx"))
    np.testing.assert_array_equal(run(path), run(tmp_path / "ref.onnx"))


def test_a_large_single_file_graph_is_written_a_tensor_at_a_time_and_reads_back_the_same(tmp_path, monkeypatch):
    """A graph under the external-data threshold but large (an SDXL-layout UNet's quantized
    graph: 1.7 GB) is not serialized whole: the file onnx.load and ONNX Runtime
    read is the same model, initializers in order, and it computes what it did."""
    import onnxruntime as ort

    from ptqd.exporter import graph_io

    model = _model()
    model.graph.initializer.append(numpy_helper.from_array(np.arange(300, dtype=np.float32), "unused"))
    monkeypatch.setattr(graph_io, "STREAM_ABOVE", 0)
    streamed = graph_io.save_graph(model, tmp_path / "streamed.onnx")
    onnx.save_model(model, str(tmp_path / "whole.onnx"))
    assert streamed.read_bytes() != (tmp_path / "whole.onnx").read_bytes()   # written the other way
    read = onnx.load(str(streamed))
    assert read.SerializeToString() == model.SerializeToString()
    x = np.ones((3, 64), np.float32)
    run = lambda path: ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(run(streamed), run(tmp_path / "whole.onnx"))
