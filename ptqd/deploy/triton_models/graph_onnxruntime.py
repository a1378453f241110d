"""Triton Python-backend model: one graph (a denoiser, the VAE decoder, a text encoder) run by
onnxruntime.

The stand-in for the TensorRT model of the same name where Triton has no TensorRT backend
(the CPU-only server): same name, inputs, outputs and batching, so the sampler's BLS calls
are the same either way. Inputs are the graph's own, batch axis first; a per-sample scalar
(timestep, class label) arrives as [batch, 1] and is flattened.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # ptqd's runtime modules, copied beside this file
sys.dont_write_bytecode = True  # for the runtime modules (the stub ignores PYTHON* variables)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from ptqd.runtime.onnxruntime import OnnxRuntimeGraph  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.graph = OnnxRuntimeGraph(HERE / params["graph"], int(params["threads"]))
        # per-sample scalars (config `reshape: []`): the graph takes them as [batch]
        self.flat = {i.name for i in self.graph.session.get_inputs() if len(i.shape) == 1}

    def _input(self, request, name):
        array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
        return array.reshape(-1) if name in self.flat else array

    def _run(self, per_request: list[dict]) -> dict:
        names = self.graph.input_names
        return self.graph.outputs(**{n: np.concatenate([p[n] for p in per_request]) for n in names})

    def execute(self, requests):
        # Requests the dynamic batcher grouped are run as one onnxruntime batch; every output of
        # the graph is answered (an SDXL text encoder's hidden states and pooled embedding).
        # Triton has checked names, types, shapes and batch sizes against config.pbtxt; what
        # onnxruntime still refuses is a value (an index past an embedding table): then each
        # request runs alone, so only the bad one is answered INVALID_ARGUMENT.
        names = self.graph.input_names
        per_request = [{n: self._input(r, n) for n in names} for r in requests]
        try:
            groups = [(per_request, self._run(per_request))]
        except Exception:
            groups = []
            for inputs in per_request:
                try:
                    groups.append(([inputs], self._run([inputs])))
                except Exception as exc:
                    reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
                    groups.append(([inputs], pb_utils.TritonError(f"onnxruntime refused the input: {reason}",
                                                                  pb_utils.TritonError.INVALID_ARG)))
        responses = []
        for members, outputs in groups:
            if isinstance(outputs, pb_utils.TritonError):
                responses.append(pb_utils.InferenceResponse(error=outputs))
                continue
            start = 0
            for inputs in members:
                count = len(inputs[names[0]])
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, out[start:start + count]) for name, out in outputs.items()]))
                start += count
        return responses
