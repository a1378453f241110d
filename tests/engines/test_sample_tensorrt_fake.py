"""`ptqd sample OUT --backend tensorrt [--cuda-graph]` through sample.py's TensorRT path, on
fake plans with a fake `tensorrt` module and a fake CUDA layer (nothing real can run here)."""
import json

import numpy as np

import ptqd.engines.tensorrt as tensorrt_module
from ptqd.sample import SampleRequest, output_sampler
from tests.conftest import EXPORT_STEPS, assert_user_error, run_cli
from tests.engines.test_tensorrt_fake_runtime import UNET_IO, FakeCuda, fake_plan, fake_runtime_trt


def _sample(out, monkeypatch, cuda_graph: bool):
    cuda = FakeCuda()
    trt = fake_runtime_trt(cuda)
    monkeypatch.setattr(tensorrt_module, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_module, "TorchCuda", lambda: cuda)
    req = SampleRequest(out=out, model=None, num=6, seed=0, steps=None, eta=None, batch_size=None,
                        backend="tensorrt", npy=None, grid=None, cuda_graph=cuda_graph)
    return output_sampler(req).generate(6, 0), trt, cuda


def test_sampling_on_plans_shares_one_buffer_and_replays_a_graph_per_engine_fake(exported_copy, monkeypatch):
    engines = exported_copy / "engines"
    schedule = json.loads((exported_copy / "scheduler" / "ptqd_schedule.json").read_text())
    memory = {cfg: 1000 * (i + 1) for i, cfg in enumerate(sorted({s["config"] for s in schedule["steps"]}))}
    assert len(memory) >= 2   # the export's schedule mixes configurations
    for cfg, need in memory.items():
        (engines / f"unet_{cfg}.plan").write_bytes(fake_plan(UNET_IO, need, (1, 4, 8)))
        (engines / f"unet_{cfg}.json").write_text(json.dumps({"batch_profile": "1,4,8"}))
    images, trt, cuda = _sample(exported_copy, monkeypatch, cuda_graph=True)
    assert images.shape == (6, 1, 16, 16) and np.isfinite(images).all()
    # every UNet runs on one buffer at the largest need, handed to every USER_MANAGED context
    assert cuda.memory_buffers() == [((max(memory.values()),), np.dtype(np.uint8))]
    assert [c.strategy for c in trt.contexts] == ["user_managed"] * len(memory)
    assert len({c.memory for c in trt.contexts}) == 1
    # 6 images at the profile's maximum batch 8: one chunk of 6, one shape per engine, so each
    # engine runs eagerly and captures once, then replays for the rest of the schedule's steps
    assert [c.eager_runs for c in trt.contexts] == [1] * len(memory)
    assert (cuda.captures, cuda.replays) == (len(memory), EXPORT_STEPS - len(memory))
    eager, _, eager_cuda = _sample(exported_copy, monkeypatch, cuda_graph=False)
    assert eager_cuda.captures == 0
    np.testing.assert_array_equal(images, eager)


def test_cuda_graph_without_the_tensorrt_backend_is_a_one_line_error(tmp_path):
    result = run_cli("sample", str(tmp_path), "--backend", "onnxruntime", "--cuda-graph",
                     "--output", str(tmp_path / "x.npy"))
    assert_user_error(result, "--cuda-graph applies to --backend tensorrt")
