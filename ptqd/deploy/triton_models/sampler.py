"""Triton Python-backend model: PTQD's denoising loop over the folded schedule.

Request: seed (INT64 [1]), num_images (INT32 [1]), optional first_index (INT64 [1]).
Response: images (FP32 [num, C, H, W] in [0, 1]); image i of a seed is the same image that
`ptqd sample OUT --backend onnxruntime --seed S` writes at index i (bit for bit with the
in-process CPU-fast graphs), whatever the batch or the request split.

Config parameters: `unets` is "bls" (each step calls the configuration's UNet model, a
TensorRT plan or its onnxruntime stand-in, through Business Logic Scripting) or "in-process"
(the CPU-fast ONNX graphs in 1/onnx run by onnxruntime inside this model); `batch` and
`min_batch` are the largest and smallest batch the UNets take; `max_images` bounds one request; `threads` sizes onnxruntime.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # ptqd's runtime modules, copied beside this file
sys.dont_write_bytecode = True  # for the runtime modules (the stub ignores PYTHON* variables)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from ptqd.engines.sampler import MinBatch, generate  # noqa: E402
from ptqd.exporter.graph_files import INPUT_NAMES, OUTPUT_NAME  # noqa: E402
from ptqd.exporter.schedule import FoldedSchedule  # noqa: E402


class BlsUNet:
    """One configuration's UNet model, called per step from inside execute()."""

    def __init__(self, model_name: str):
        self.model_name = model_name

    def __call__(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        inputs = [pb_utils.Tensor(INPUT_NAMES[0], np.ascontiguousarray(sample, dtype=np.float32)),
                  pb_utils.Tensor(INPUT_NAMES[1], timestep.astype(np.float32).reshape(-1, 1))]
        request = pb_utils.InferenceRequest(
            model_name=self.model_name, inputs=inputs, requested_output_names=[OUTPUT_NAME],
            # a TensorRT model answers in GPU memory otherwise, which as_numpy() refuses
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.model_name}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, OUTPUT_NAME).as_numpy()


def _scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if default is None:
            raise ValueError(f"input {name!r} is required")
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise ValueError(f"input {name!r} takes one value, got {values.size}")
    return int(values[0])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.schedule = FoldedSchedule.load(HERE)
        self.batch = int(params["batch"])
        self.max_images = int(params["max_images"])
        if params["unets"] == "bls":
            # a TensorRT profile may start above 1; Triton rejects smaller batches, so pad them
            min_batch = int(params.get("min_batch", "1"))
            self.engines = {cfg: MinBatch(BlsUNet(f"unet_{cfg}"), min_batch) for cfg in self.schedule.configs}
        else:
            from ptqd.engines.onnxruntime import OnnxRuntimeUNet
            from ptqd.exporter.graph_files import graph_path

            threads = int(params["threads"])
            self.engines = {cfg: OnnxRuntimeUNet(graph_path(HERE / "onnx", cfg, "cpu-fast"), threads)
                            for cfg in self.schedule.configs}

    def _run(self, request):
        seed = _scalar(request, "seed")
        num = _scalar(request, "num_images")
        first = _scalar(request, "first_index", 0)
        if seed < 0 or first < 0:
            raise ValueError("seed and first_index must be >= 0")
        if not 1 <= num <= self.max_images:
            raise ValueError(f"num_images must be in 1..{self.max_images}, got {num}")
        images = generate(self.schedule, self.engines, num, seed, self.batch, first_index=first)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", images)])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._run(request))
            except Exception as exc:  # one bad request must not take the others down
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
