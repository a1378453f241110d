"""Graphs past protobuf's 2 GiB keep their weights in `<graph>.data` (exporter/graph_io.py).
Forced on the built-in model's small graphs (PTQD_EXTERNAL_DATA_ABOVE=0), every stage that
reads, copies, checks or builds a graph takes them: export, lint, the ONNX Runtime engines,
the build script (with the stand-ins for trtexec and Polygraphy), the Triton repository in both
of its graph modes, verify, and sampling."""
import json
import os

import numpy as np
import onnx

from ptqd.deploy.repository import SAMPLER
from ptqd.output import file_sha256, graph_sha256
from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
from tests.conftest import run_cli
from tests.engines.test_build import _run_build_script


def _sample(out, path):
    result = run_cli("sample", str(out), "--backend", "onnxruntime", "--num", "2", "--seed", "4", "--output", str(path))
    assert result.returncode == 0, result.stderr
    return np.load(path)


def test_graphs_forced_into_external_data_go_through_every_stage_fake_trtexec(exported_copy, tmp_path):
    out = exported_copy
    before = _sample(out, tmp_path / "before.npy")
    env = {**os.environ, "PTQD_EXTERNAL_DATA_ABOVE": "0"}
    result = run_cli("export", str(out), "--force", env=env)
    assert result.returncode == 0, result.stderr
    for graph in sorted((out / "onnx").glob("*.onnx")):
        # every tensor of 1 KB or more lives in the data file (the built-in model's packed INT4
        # weights are mostly smaller, and stay inside)
        assert graph.with_name(graph.name + ".data").is_file(), graph.name
        inits = onnx.load(str(graph), load_external_data=False).graph.initializer
        assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in inits), graph.name
        assert all(len(i.raw_data) < 1024 for i in inits), graph.name
    assert "weights in unet_w4a8.onnx.data" in result.stdout

    lint = run_cli("lint", str(out / "onnx" / "unet_w4a8.onnx"), str(out / "onnx" / "unet_w8a8.onnx"))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    build = run_cli("build", str(out), "--backend", "onnxruntime", "--force")
    assert build.returncode == 0, build.stderr
    assert np.array_equal(_sample(out, tmp_path / "after.npy"), before)

    x, t = np.random.default_rng(0).standard_normal((2, 1, 16, 16), dtype=np.float32), np.array([900.0, 5.0], np.float32)
    graph = out / "onnx" / "unet_w4a8.cpu.onnx"
    expected = OnnxRuntimeUNet(graph)(x, t)
    for unets, copy in (("onnxruntime", out / "triton" / "unet_w4a8" / "1" / "model.onnx"),
                        ("in-process", out / "triton" / SAMPLER / "1" / "onnx" / graph.name)):
        deploy = run_cli("deploy", str(out), "--unets", unets, "--force")
        assert deploy.returncode == 0, deploy.stderr
        # the data file keeps the name the graph records, so the renamed copy still finds it
        assert (copy.parent / "unet_w4a8.cpu.onnx.data").is_file(), unets
        assert np.array_equal(OnnxRuntimeUNet(copy)(x, t), expected), unets
        verify = run_cli("verify", str(out))
        assert verify.returncode == 0, verify.stdout + verify.stderr

    script, calls = _run_build_script(out, tmp_path)
    assert script.returncode == 0, script.stderr
    assert any(c.startswith("trtexec --onnx=onnx/unet_w4a8.onnx") for c in calls)
    # the plan records the graph and its weights: the bytes `ptqd verify` hashes to spot a stale plan
    meta = json.loads((out / "engines" / "unet_w4a8.json").read_text())
    assert meta["source_onnx_sha256"] == graph_sha256(out / "onnx" / "unet_w4a8.onnx")
    assert meta["source_onnx_sha256"] != file_sha256(out / "onnx" / "unet_w4a8.onnx")
    (out / "onnx" / "unet_w4a8.onnx.data").unlink()
    script, _ = _run_build_script(out, tmp_path)
    assert script.returncode != 0
    assert "onnx/unet_w4a8.onnx.data is missing" in script.stderr
    assert "onnx/unet_w4a8.onnx.data: missing" in run_cli("verify", str(out)).stdout
