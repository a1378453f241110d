"""Triton Python-backend model: one UNet graph run by onnxruntime.

The stand-in for the configuration's TensorRT model where Triton has no TensorRT backend
(the CPU-only server): same name, inputs, outputs and batching, so the sampler's BLS calls
are the same either way.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # ptqd's runtime modules, copied beside this file
sys.dont_write_bytecode = True  # for the runtime modules (the stub ignores PYTHON* variables)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from ptqd.engines.onnxruntime import OnnxRuntimeUNet  # noqa: E402
from ptqd.exporter.graph_files import INPUT_NAMES, OUTPUT_NAME  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.unet = OnnxRuntimeUNet(HERE / params["graph"], int(params["threads"]))

    def execute(self, requests):
        # Requests the dynamic batcher grouped are run as one onnxruntime batch.
        samples = [pb_utils.get_input_tensor_by_name(r, INPUT_NAMES[0]).as_numpy() for r in requests]
        timesteps = [pb_utils.get_input_tensor_by_name(r, INPUT_NAMES[1]).as_numpy().reshape(-1)
                     for r in requests]
        eps = self.unet(np.concatenate(samples), np.concatenate(timesteps))
        responses, start = [], 0
        for sample in samples:
            part = eps[start:start + len(sample)]
            start += len(sample)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, part)]))
        return responses
