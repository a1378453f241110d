"""The real CPU Triton server serving the new model families' repositories: a quantized
SDXL-shaped model with its two text encoders as separate models over BLS (the TensorRT layout,
ONNX Runtime standing in for the plans; the second encoder answers with two outputs), and a
DiT, whose models are named for a transformer. Served images equal the local sampler's."""
import shutil

import numpy as np

from ptqd.deploy.client import request_images
from ptqd.deploy.server import LocalTritonServer
from ptqd.sample import SampleRequest, output_sampler
from tests.conftest import run_cli

PROMPTS = ("a red cube on a table", "a blue sphere")


def _local(out, num, seed, conditions, negative_prompt=None):
    req = SampleRequest(out=out, model=None, num=num, seed=seed, steps=None, eta=None, batch_size=None,
                        backend="onnxruntime", npy=None, grid=None, conditions=tuple(conditions),
                        negative_prompt=negative_prompt)
    return output_sampler(req).generate(num, seed)


def test_quantized_sdxl_served_as_separate_models_equals_local_sampler(tiny_sdxl_export, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_sdxl_export, out)
    result = run_cli("deploy", str(out), "--unets", "onnxruntime", "--force")
    assert result.returncode == 0, result.stderr
    models = {p.name for p in (out / "triton").iterdir()}
    assert {"ptqd_sampler", "text_encoder", "text_encoder_2", "vae_decoder", "unet_w4a8"} <= models
    config = (out / "triton" / "ptqd_sampler" / "config.pbtxt").read_text()
    assert 'name: "negative_prompt"' in config
    with LocalTritonServer(out / "triton", log_path=tmp_path / "triton.log") as server:
        served = request_images(server.http_url, 3, seed=4, prompts=PROMPTS)
        negative = request_images(server.grpc_url, 3, seed=4, protocol="grpc", prompts=PROMPTS,
                                  negative_prompt="blurry")
    assert served.shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(served, _local(out, 3, 4, PROMPTS))
    np.testing.assert_array_equal(negative, _local(out, 3, 4, PROMPTS, "blurry"))
    assert np.abs(served - negative).mean() > 1e-4
    assert run_cli("verify", str(out)).returncode == 0


def test_dit_served_as_transformer_models_with_class_labels(tiny_dit_export, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_dit_export, out)
    assert run_cli("deploy", str(out), "--unets", "onnxruntime", "--force").returncode == 0
    models = {p.name for p in (out / "triton").iterdir()}
    assert [m for m in models if m.startswith("transformer_")] and not [m for m in models if m.startswith("unet")]
    with LocalTritonServer(out / "triton", log_path=tmp_path / "triton.log") as server:
        served = request_images(server.http_url, 2, seed=1, classes=(7, 999))
    np.testing.assert_array_equal(served, _local(out, 2, 1, (7, 999)))
