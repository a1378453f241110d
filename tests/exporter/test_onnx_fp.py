import numpy as np
import onnx
import pytest
import torch

from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
from ptqd.exporter.onnx_fp import export_fp_onnx


@pytest.fixture(scope="module")
def fp_onnx(builtin_unet, tmp_path_factory):
    return export_fp_onnx(builtin_unet, tmp_path_factory.mktemp("onnx") / "unet_fp32.onnx")


def test_fp_graph_has_dynamic_batch_and_opset_21(fp_onnx):
    model = onnx.load(str(fp_onnx))
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [i.name for i in model.graph.input] == ["sample", "timestep"]


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_pytorch(builtin_unet, fp_onnx, batch):
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 1, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen).float()
    expected = builtin_unet(x, t).sample.numpy()
    got = OnnxRuntimeUNet(fp_onnx)(x.numpy(), t.numpy())
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


def test_every_conv_and_linear_maps_to_its_node_by_name(fp_onnx, builtin_unet):
    from ptqd.exporter.onnx_fp import layer_nodes

    nodes = layer_nodes(onnx.load(str(fp_onnx)))
    modules = {m: mod for m, mod in builtin_unet.named_modules()
               if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(nodes) == set(modules)
    for name, node in nodes.items():
        expected = "Conv" if isinstance(modules[name], torch.nn.Conv2d) else ("Gemm", "MatMul")
        assert node.op_type in expected, (name, node.op_type)
