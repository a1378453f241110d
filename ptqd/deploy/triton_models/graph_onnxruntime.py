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
        # integer inputs that index an embedding table: its rows (repository.py reads them from the graph)
        self.index_rows = json.loads(params.get("index_rows", "{}"))

    def _input(self, request, name):
        array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
        return array.reshape(-1) if name in self.flat else array

    def _bad_index(self, inputs: dict) -> str | None:
        """Why a request's indices are out of its tables (Triton has checked names, types,
        shapes and batch sizes against config.pbtxt), or None."""
        for name, rows in self.index_rows.items():
            values = inputs[name]
            if values.size and (values.min() < 0 or values.max() >= rows):
                bad = values[(values < 0) | (values >= rows)].reshape(-1)[0]
                return f"input {name!r} takes indices in 0..{rows - 1}, got {bad}"
        return None

    def execute(self, requests):
        # Requests the dynamic batcher grouped are run as one onnxruntime batch, but for those
        # refused as the client's error (INVALID_ARGUMENT); every output of the graph is
        # answered (an SDXL text encoder's hidden states and pooled embedding).
        names = self.graph.input_names
        per_request = [{n: self._input(r, n) for n in names} for r in requests]
        refused = [self._bad_index(inputs) for inputs in per_request]
        good = [inputs for inputs, why in zip(per_request, refused) if why is None]
        outputs, error = {}, None
        if good:
            try:
                outputs = self.graph.outputs(**{n: np.concatenate([p[n] for p in good]) for n in names})
            except Exception as exc:   # the server's failure (INTERNAL), for every request of the batch
                error = pb_utils.TritonError(f"onnxruntime: {(str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]}")
        responses, start = [], 0
        for inputs, why in zip(per_request, refused):
            if why is not None:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(why, pb_utils.TritonError.INVALID_ARG)))
                continue
            count = len(inputs[names[0]])
            if error is not None:
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, out[start:start + count]) for name, out in outputs.items()]))
            start += count
        return responses
