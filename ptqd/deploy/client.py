"""Ask a Triton server running ptqd's repository for images (`ptqd client`)."""
from __future__ import annotations

import numpy as np

from ptqd.deploy.model_config import NEGATIVE_PROMPT_INPUT, SAMPLER_OUTPUT
from ptqd.deploy.repository import SAMPLER
from ptqd.errors import UserError

PROTOCOLS = ("http", "grpc")


def _module(protocol: str):
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol!r}: expected http or grpc")
    try:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError:
        raise UserError("the client needs tritonclient, a ptqd dependency: reinstall ptqd (make install)") from None
    return module


TRITON_DTYPES = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(object): "BYTES"}


def _inputs(module, seed: int, num: int, first_index: int, prompts=(), classes=(),
            negative_prompt: str | None = None) -> list:
    values = {"seed": np.array([seed], dtype=np.int64), "num_images": np.array([num], dtype=np.int32),
              "first_index": np.array([first_index], dtype=np.int64)}
    if prompts:
        values["prompt"] = np.array([p.encode("utf-8") for p in prompts], dtype=object)
    if negative_prompt is not None:
        values[NEGATIVE_PROMPT_INPUT] = np.array([negative_prompt.encode("utf-8")], dtype=object)
    if classes:
        values["class_label"] = np.array(classes, dtype=np.int64)
    inputs = []
    for name, value in values.items():
        tensor = module.InferInput(name, list(value.shape), TRITON_DTYPES[value.dtype])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def request_images(url: str, num: int, seed: int, first_index: int = 0, protocol: str = "http",
                   model: str = SAMPLER, timeout: float = 600.0, prompts: tuple[str, ...] = (),
                   classes: tuple[int, ...] = (), negative_prompt: str | None = None) -> np.ndarray:
    """Images first_index.. of `seed` from the sampler model: float32 [num, C, H, W] in [0, 1];
    a conditional model's image j is conditioned on prompts/classes[j % count] (a text model's
    unconditional half on negative_prompt, if given)."""
    from tritonclient.utils import InferenceServerException

    module = _module(protocol)
    host, _, port = url.rpartition(":")
    if "://" in url or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"--url {url!r}: give host:port without a scheme, e.g. 127.0.0.1:8000")
    inputs = _inputs(module, seed, num, first_index, prompts, classes, negative_prompt)
    outputs = [module.InferRequestedOutput(SAMPLER_OUTPUT)]
    client = None
    try:
        if protocol == "http":
            client = module.InferenceServerClient(url, network_timeout=timeout, connection_timeout=timeout)
            result = client.infer(model, inputs, outputs=outputs)
        else:
            client = module.InferenceServerClient(url)
            result = client.infer(model, inputs, outputs=outputs, client_timeout=timeout)
    except InferenceServerException as exc:
        raise UserError(f"{url}: {exc.message() or exc}") from None
    except (ConnectionError, OSError, ValueError) as exc:  # ValueError: a port out of range
        raise UserError(f"cannot reach a Triton server at {url} ({exc})") from None
    finally:
        # an open connection holds a stopping server for its 30 s exit timeout
        if client is not None:
            client.close()
    images = result.as_numpy(SAMPLER_OUTPUT)
    if images is None or images.shape[0] != num:
        raise UserError(f"{url}: the server answered without {num} images")
    return images
