"""Measured latencies: the Python builder times each plan (fake tensorrt, fake CUDA) and
writes engines/<plan stem>.timing.json; measured_latencies reads those files back."""
import json

import pytest
import torch

from ptqd.engines.profiles import BatchProfile, input_shapes
from ptqd.engines.tensorrt import BuildSettings, EngineBuilder
from ptqd.engines.timing import measured_latencies, timing_record, write_timing
from tests.engines.test_build import _fake_tensorrt
from tests.engines.test_tensorrt_fake_runtime import UNET_IO, FakeCuda, fake_plan, fake_runtime_trt


def _builder_with_runtime(calls, cuda, memory=4096):
    trt = fake_runtime_trt(cuda, trt=_fake_tensorrt("10.13.3.9", 1, calls))
    trt.Builder.build_serialized_network = lambda self, network, config: fake_plan(UNET_IO, memory, (2, 4, 16))
    return trt


def test_builder_times_each_plan_at_the_opt_batch_with_cuda_graphs_fake(exported, tmp_path, capsys):
    cuda = FakeCuda()
    trt = _builder_with_runtime([], cuda)
    settings = BuildSettings(BatchProfile(2, 4, 16))
    builder = EngineBuilder(settings, tmp_path / "timing.cache", trt, cuda=cuda)
    shapes = input_shapes([1, 16, 16], settings.profile)
    for cfg in ("w4a8", "w8a8"):
        builder.build(exported / "onnx" / f"unet_{cfg}.onnx", tmp_path / f"unet_{cfg}.plan", cfg, shapes)
    record = json.loads((tmp_path / "unet_w4a8.timing.json").read_text())
    # FakeCuda.time_ms returns 1, 2, ..., 50 ms for the 50 timed calls: their median
    assert record == {"format_version": 1, "engine": "unet_w4a8.plan", "config": "w4a8", "median_ms": 25.5,
                      "batch": 4, "measured_by": "tensorrt-python", "tensorrt_version": "10.13.3.9",
                      "gpu": record["gpu"], "cuda_graph": True}
    assert cuda.timed == (10, 50) and cuda.captures == 2   # one graph per plan, at the opt shape
    assert sorted(measured_latencies(tmp_path)) == ["w4a8", "w8a8"]
    assert "unet_w8a8.plan (w8a8): median 25.5 ms per call at batch 4" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_builder_without_a_gpu_still_builds_and_says_it_did_not_time_fake(exported, tmp_path, capsys):
    # no CUDA device on this machine: the plan and its metadata are written, no timing file
    trt = _builder_with_runtime([], FakeCuda())
    settings = BuildSettings(BatchProfile(2, 4, 16))
    builder = EngineBuilder(settings, tmp_path / "timing.cache", trt)
    builder.build(exported / "onnx" / "unet_w4a8.onnx", tmp_path / "unet_w4a8.plan", "w4a8",
                  input_shapes([1, 16, 16], settings.profile))
    assert (tmp_path / "unet_w4a8.json").is_file() and not (tmp_path / "unet_w4a8.timing.json").exists()
    assert "unet_w4a8.plan: not timed (--backend tensorrt needs a CUDA GPU" in capsys.readouterr().err


def test_measured_latencies_reads_valid_unet_files_and_skips_the_rest(tmp_path):
    good = timing_record("unet_w4a8", "w4a8", 1.25, 4, "trtexec", "10.13", "NVIDIA H100", True)
    write_timing(tmp_path, "unet_w4a8", good)
    write_timing(tmp_path, "unet_fp16", timing_record("unet_fp16", "fp16", 2.5, 4, "trtexec", "10.13", "x", True))
    write_timing(tmp_path, "vae_decoder", timing_record("vae_decoder", "fp16", 9.0, 4, "trtexec", "10.13", "x", True))
    (tmp_path / "unet_w8a8.timing.json").write_text('{"config": "w8a8", "median_ms": ')          # truncated
    (tmp_path / "unet_w4a4.timing.json").write_text('{"config": "w4a4", "median_ms": 0, "batch": 4}')
    (tmp_path / "unet_w6a8.timing.json").write_text('{"config": "w6a8", "median_ms": 1.0}')      # no batch
    (tmp_path / "unet_w2a8.timing.json").write_text('{"config": "w4a8", "median_ms": 1.0, "batch": 4}')  # renamed
    (tmp_path / "unet_w3a8.timing.json").write_bytes(b"\xff\xfe")
    (tmp_path / "unet_w5a8.timing.json").write_text("[1, 2]")
    found = measured_latencies(tmp_path)
    assert found == {"w4a8": good, "fp16": json.loads((tmp_path / "unet_fp16.timing.json").read_text())}
    assert measured_latencies(tmp_path / "missing") == {}
