"""The real Triton server (as in test_triton_server.py, no skipping) serving conditional latent
pipelines end to end: prompt or class label in, tokenizer + text encoder, guided denoising
over the folded schedule, VAE decoder, images out, bit-identical to the local sampler."""
import numpy as np
import pytest

from ptqd.deploy.client import request_images
from ptqd.deploy.server import LocalTritonServer
from ptqd.errors import UserError
from ptqd.sample import SampleRequest, output_sampler
from tests.conftest import run_cli
from tests.deploy.bad_requests import check_graph_model, check_mixed_batch, check_sampler

PROMPTS = ("a red cube on a table", "a blue sphere", "a yellow cone")


def _local(out, num, seed, conditions, first=0):
    req = SampleRequest(out=out, model=None, num=num, seed=seed, steps=None, eta=None, batch_size=None,
                        backend="onnxruntime", npy=None, grid=None, conditions=tuple(conditions))
    return output_sampler(req).generate(num, seed, first_index=first)


def _serve(repository, log):
    return LocalTritonServer(repository, log_path=log)


def test_text_pipeline_served_in_process_equals_local_sampler(tiny_text_export, tmp_path):
    out = tiny_text_export
    with _serve(out / "triton", tmp_path / "triton.log") as server:
        served = request_images(server.http_url, 5, seed=7, prompts=PROMPTS)
        assert served.shape == (5, 3, 16, 16)
        np.testing.assert_array_equal(served, _local(out, 5, 7, PROMPTS))
        # image i of the seed gets prompt i % 3 in any request: images 2..3 alone are rows 2..3
        over_grpc = request_images(server.grpc_url, 2, seed=7, first_index=2, protocol="grpc", prompts=PROMPTS)
        np.testing.assert_array_equal(over_grpc, served[2:4])
        # no prompt: the prompts it was calibrated with; another prompt: other images
        np.testing.assert_array_equal(request_images(server.http_url, 2, seed=7), _local(out, 2, 7, ()))
        other = request_images(server.http_url, 2, seed=7, prompts=("a green tree",))
        assert np.abs(other - served[:2]).mean() > 1e-3
        # malformed requests are the client's errors; the server carries on
        check_sampler(server, "text")
        np.testing.assert_array_equal(request_images(server.http_url, 5, seed=7, prompts=PROMPTS), served)


def test_text_pipeline_as_separate_models_over_bls_equals_local_sampler(tiny_text_export, tmp_path):
    """--unets onnxruntime: UNets, VAE decoder and text encoder are Triton models of their own
    (the TensorRT layout, with ONNX Runtime standing in for the plans), called through BLS."""
    out = tmp_path / "out"
    import shutil

    shutil.copytree(tiny_text_export, out)
    result = run_cli("deploy", str(out), "--unets", "onnxruntime", "--force")
    assert result.returncode == 0, result.stderr
    models = sorted(p.name for p in (out / "triton").iterdir())
    assert {"ptqd_sampler", "vae_decoder", "text_encoder", "unet_w4a8"} <= set(models)
    with _serve(out / "triton", tmp_path / "triton.log") as server:
        # every graph model refuses malformed requests on its own, and a bad one batched with
        # good ones fails alone
        for name in ("text_encoder", "unet_w4a8", "vae_decoder"):
            check_graph_model(server, out / "triton" / name)
        check_mixed_batch(server, out / "triton" / "text_encoder")
        served = request_images(server.http_url, 5, seed=7, prompts=PROMPTS)
    np.testing.assert_array_equal(served, _local(out, 5, 7, PROMPTS))


def test_class_pipeline_served_with_class_labels(tiny_class_export, tmp_path):
    out = tiny_class_export
    with _serve(out / "triton", tmp_path / "triton.log") as server:
        served = request_images(server.http_url, 3, seed=2, classes=(4, 7))
        np.testing.assert_array_equal(served, _local(out, 3, 2, (4, 7)))
        with pytest.raises(UserError, match="0..9"):
            request_images(server.http_url, 1, seed=2, classes=(11,))
        check_sampler(server, "class")
        # the server carries on after a bad request
        np.testing.assert_array_equal(request_images(server.http_url, 1, seed=2, classes=(4,)), served[:1])
