"""A real Triton server (the tritonserver binary bundled in nvidia-pytriton, Python backend)
serving the repository export-trt wrote: images over HTTP and gRPC equal the local sampler's
for the same seed, and 32 concurrent requests are all answered correctly.

No skipping: if the server cannot start (environment missing, stub broken), these fail.
`make test` builds the server's environment (`make triton-env`)."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ptqd.deploy.client import request_images
from ptqd.deploy.server import LocalTritonServer
from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
from ptqd.runtime.sampler import generate
from ptqd.errors import UserError
from ptqd.runtime.layout import graph_path
from ptqd.runtime.schedule import FoldedSchedule
from tests.conftest import assert_user_error, run_cli
from tests.deploy.bad_requests import check_sampler


@pytest.fixture(scope="module")
def local_sampler(exported):
    """The sampler ptqd runs outside Triton: same schedule file, same CPU-fast graphs."""
    schedule = FoldedSchedule.load(exported / "scheduler")
    engines = {c: OnnxRuntimeUNet(graph_path(exported / "onnx", c, "cpu-fast")) for c in schedule.configs}
    return lambda num, seed, first=0: generate(schedule, engines, num, seed, 8, first_index=first)


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with LocalTritonServer(exported / "triton", log_path=log) as running:
        yield running
    assert running.process.returncode is not None  # stopped, not left behind


def test_server_images_equal_local_sampler(server, exported, tmp_path):
    local = tmp_path / "local.npy"
    result = run_cli("sample", str(exported), "--backend", "onnxruntime", "--seed", "5", "--num", "6",
                     "--output", str(local))
    assert result.returncode == 0, result.stderr
    expected = np.load(local)
    over_http = request_images(server.http_url, 6, seed=5)
    assert over_http.shape == (6, 1, 16, 16) and over_http.dtype == np.float32
    np.testing.assert_array_equal(over_http, expected)
    # images are numbered per seed: images 2..4 alone are the middle of the batch above
    over_grpc = request_images(server.grpc_url, 3, seed=5, first_index=2, protocol="grpc")
    np.testing.assert_array_equal(over_grpc, expected[2:5])
    assert not np.array_equal(request_images(server.http_url, 6, seed=6), expected)


def test_32_concurrent_requests_all_answered_and_right(server, local_sampler):
    def ask(i):
        protocol = "grpc" if i % 2 else "http"
        url = server.grpc_url if i % 2 else server.http_url
        return request_images(url, 2, seed=100 + i, protocol=protocol)

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert len(answers) == 32
    for i, images in enumerate(answers):
        np.testing.assert_array_equal(images, local_sampler(2, 100 + i), err_msg=f"request {i}")


def test_bad_requests_are_invalid_argument_and_the_server_carries_on(server, local_sampler):
    assert check_sampler(server, "unconditional") >= 12
    with pytest.raises(UserError, match="num_images must be in 1..256"):   # ptqd's client says so in one line
        request_images(server.http_url, 1000, seed=0)
    np.testing.assert_array_equal(request_images(server.http_url, 1, seed=0), local_sampler(1, 0))
    np.testing.assert_array_equal(request_images(server.grpc_url, 1, seed=0, protocol="grpc"), local_sampler(1, 0))


def test_client_cli_writes_the_served_images(server, local_sampler, tmp_path):
    npy, grid = tmp_path / "served.npy", tmp_path / "served.png"
    result = run_cli("client", "--url", server.http_url, "--num", "4", "--seed", "9",
                     "--output", str(npy), "--grid", str(grid))
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(npy), local_sampler(4, 9))
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bls_repository_serves_the_same_images(exported_copy, local_sampler, tmp_path):
    """UNets as their own Triton models, called per step through BLS: the TensorRT layout,
    with onnxruntime Python models standing in for the plans. Two sampler instances, so
    concurrent requests meet in the UNet models' dynamic batcher."""
    result = run_cli("deploy", str(exported_copy), "--unets", "onnxruntime", "--instances", "2", "--force")
    assert result.returncode == 0, result.stderr
    with LocalTritonServer(exported_copy / "triton", log_path=tmp_path / "tritonserver.log") as server:
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda i: request_images(server.http_url, 3, seed=200 + i), range(8)))
    for i, images in enumerate(answers):
        np.testing.assert_array_equal(images, local_sampler(3, 200 + i), err_msg=f"request {i}")
    assert run_cli("verify", str(exported_copy)).returncode == 0


def test_server_that_cannot_start_fails_loudly(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 0\n')
    with pytest.raises(UserError, match="tritonserver exited"):
        LocalTritonServer(tmp_path, log_path=tmp_path / "log.txt").start(timeout=60)


def test_serve_refuses_a_busy_port_and_a_missing_environment(exported, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_user_error(run_cli("serve", str(exported), "--http-port", str(port)), f"port {port}", "in use")
    assert_user_error(run_cli("serve", str(exported), "--triton-env", str(tmp_path / "none")),
                      "no Triton server environment", "make triton-env")
