"""Malformed requests sent by an independent client (tritonclient's own InferInput, not ptqd's
client) to a running server, over HTTP and gRPC: each must be answered INVALID_ARGUMENT (HTTP
400) with a one-line reason. The tests that start servers call these, then check that a good
request still gets the right images."""
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from ptqd.deploy.model_config import TRITON_TYPES, parse_config, type_name

STATUS = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
NUMPY = {triton: np.dtype(numpy) for numpy, triton in TRITON_TYPES.items()}


def _i64(*v):
    return np.array(v, dtype=np.int64)


def _i32(*v):
    return np.array(v, dtype=np.int32)


def _text(*v):
    return np.array(list(v), dtype=object)


def infer(protocol: str, url: str, model: str, arrays: dict):
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    client = module.InferenceServerClient(url)
    try:
        inputs = []
        for name, value in arrays.items():
            tensor = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return client.infer(model, inputs)
    finally:
        client.close()


def assert_invalid_argument(server, model: str, arrays: dict, reason: str) -> None:
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        with pytest.raises(InferenceServerException) as caught:
            infer(protocol, url, model, arrays)
        message = caught.value.message() or ""
        where = f"{model} over {protocol} with {sorted(arrays)}: {message!r}"
        assert caught.value.status() == STATUS[protocol], where
        assert reason in message and "\n" not in message.strip(), where


GOOD = {"seed": _i64(1), "num_images": _i32(1)}
COMMON = [  # (request, what the answer says)
    ({**GOOD, "num_images": _i32(0)}, "num_images must be in 1..256, got 0"),
    ({**GOOD, "num_images": _i32(-3)}, "num_images must be in 1..256, got -3"),
    ({**GOOD, "num_images": _i32(100000)}, "num_images must be in 1..256, got 100000"),
    ({**GOOD, "seed": _i64(-1)}, "seed and first_index must be >= 0"),
    ({**GOOD, "first_index": _i64(-5)}, "seed and first_index must be >= 0"),
    ({"num_images": _i32(1)}, "seed"),                                            # missing
    ({**GOOD, "seed": np.array([1.5], dtype=np.float32)}, "data-type"),           # wrongly typed
    ({**GOOD, "num_images": _i64(2)}, "data-type"),
    ({**GOOD, "seed": _i64(1, 2)}, "shape"),                                      # two seeds
    ({**GOOD, "no_such_input": _i64(1)}, "no_such_input"),                        # unknown input
]
BY_KIND = {
    "unconditional": [({**GOOD, "prompt": _text(b"a cat")}, "prompt"),
                      ({**GOOD, "class_label": _i64(3)}, "class_label")],
    "class": [({**GOOD, "class_label": _i64(11)}, "class labels must be integers in 0..9, got 11"),
              ({**GOOD, "class_label": _i64(2, -1)}, "class labels must be integers in 0..9, got -1"),
              ({**GOOD, "class_label": _i64()}, "'class_label' is empty"),
              ({**GOOD, "class_label": np.array([1.0], dtype=np.float32)}, "data-type"),
              ({**GOOD, "prompt": _text(b"a cat")}, "prompt")],
    "text": [({**GOOD, "prompt": _text(b"\xff\xfe not utf-8")}, "utf-8"),
             ({**GOOD, "prompt": _text()}, "'prompt' is empty"),
             ({**GOOD, "negative_prompt": _text(b"a", b"b")}, "shape"),
             ({**GOOD, "prompt": _i64(3)}, "data-type"),
             ({**GOOD, "class_label": _i64(3)}, "class_label")],
}


def check_sampler(server, kind: str, model: str = "ptqd_sampler") -> int:
    """Every malformed sampler request for a model of this conditioning kind; returns how many."""
    cases = COMMON + BY_KIND[kind]
    for arrays, reason in cases:
        assert_invalid_argument(server, model, arrays, reason)
    return len(cases)


def check_graph_model(server, model_dir) -> int:
    """Malformed requests to one graph model (a denoiser, text encoder or VAE decoder) of the
    repository, from its config.pbtxt: an input left out, one of the wrong type, a batch past
    max_batch_size, batch sizes that disagree, and an integer input (class label, token ids)
    past its embedding table."""
    config = parse_config((model_dir / "config.pbtxt").read_text())
    good = {}
    for tensor in config.input:
        dims = [1] if list(tensor.dims) == [1] and tensor.HasField("reshape") else list(tensor.dims)
        good[tensor.name] = np.zeros([1, *dims], dtype=NUMPY[type_name(tensor.data_type)])
    first = next(iter(good))
    cases = [({k: v for k, v in good.items() if k != first}, first),
             ({**good, first: good[first].astype(np.float64)}, "data-type"),
             ({k: np.repeat(v, config.max_batch_size + 1, axis=0) for k, v in good.items()}, "batch")]
    if len(good) > 1:
        second = list(good)[1]
        cases.append(({**good, second: np.repeat(good[second], 2, axis=0)}, "batch"))
    integers = [k for k, v in good.items() if v.dtype == np.int64 and k != "timestep"]
    for name in integers:
        cases.append(({**good, name: np.full_like(good[name], 10**9)}, f"input {name!r} takes indices in 0.."))
        cases.append(({**good, name: np.full_like(good[name], -1)}, f"input {name!r} takes indices in 0.."))
    for arrays, reason in cases:
        assert_invalid_argument(server, model_dir.name, arrays, reason)
    infer("http", server.http_url, model_dir.name, good)   # and a good one is still answered
    return len(cases)


def check_mixed_batch(server, model_dir, rounds: int = 5) -> None:
    """Good and out-of-range requests sent together, so the dynamic batcher groups them: each
    bad one is refused alone and each good one is answered as if it had come alone. Fails
    unless some round ran fewer executions than requests (they really met in a batch)."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.http as http

    config = parse_config((model_dir / "config.pbtxt").read_text())
    (tensor,) = config.input   # a text encoder: token ids
    rng = np.random.default_rng(0)
    goods = [rng.integers(0, 100, size=[1, *tensor.dims], dtype=np.int64) for _ in range(6)]
    alone = [infer("http", server.http_url, model_dir.name, {tensor.name: g}).as_numpy(config.output[0].name)
             for g in goods]
    bad = {tensor.name: np.full([1, *tensor.dims], 10**9, dtype=np.int64)}
    client = http.InferenceServerClient(server.http_url)
    batched = False
    for _ in range(rounds):
        before = client.get_inference_statistics(model_dir.name)["model_stats"][0]["execution_count"]
        jobs = [{tensor.name: g} for g in goods] + [bad, bad]
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [pool.submit(infer, "http", server.http_url, model_dir.name, job) for job in jobs]
        for i, future in enumerate(futures[:len(goods)]):
            np.testing.assert_array_equal(future.result().as_numpy(config.output[0].name), alone[i])
        for future in futures[len(goods):]:
            with pytest.raises(InferenceServerException, match="takes indices in 0.."):
                future.result()
        executions = client.get_inference_statistics(model_dir.name)["model_stats"][0]["execution_count"]
        batched |= int(executions) - int(before) < len(goods)
    client.close()
    assert batched, f"{model_dir.name}: concurrent requests never met in one execution"
