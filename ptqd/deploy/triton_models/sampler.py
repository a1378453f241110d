"""Triton Python-backend model: the whole pipeline around PTQD's denoising loop: encode the
prompt (tokenizer + text encoder) or class label, denoise over the folded schedule with
classifier-free guidance, decode the latents (VAE decoder).

Request: seed (INT64 [1]), num_images (INT32 [1]), optional first_index (INT64 [1]); for a
text model optional prompt (BYTES [n]) and negative_prompt (BYTES [1]), for a class-conditional
one optional class_label (INT64 [n]): image i of the seed uses item i % n (default: the
prompts/classes it was calibrated with).
Response: images (FP32 [num, C, H, W] in [0, 1]); image i of a seed is the same image that
`ptqd sample OUT --backend onnxruntime --seed S` (with the same prompts or classes) writes at
index i (bit for bit with the in-process CPU-fast graphs), whatever the batch.
A request the model cannot take (a count out of range, a negative seed, an unknown class, a
prompt that is not UTF-8 text) is answered INVALID_ARGUMENT (HTTP 400) with a one-line reason;
Triton itself answers so for missing, unknown or wrongly typed inputs.

Config parameters: `unets` is "bls" (each step calls the configuration's denoiser model, a
TensorRT plan or its onnxruntime stand-in, through Business Logic Scripting) or "in-process"
(the CPU-fast ONNX graphs in 1/onnx run by onnxruntime inside this model); `batch` and
`min_batch` are the largest and smallest batch the denoisers take; `max_images` bounds one
request; `threads` sizes onnxruntime. Which models there are is the deployment's list
(runtime.layout.deployment), the same list the repository was written from.
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # ptqd's runtime modules, copied beside this file
sys.dont_write_bytecode = True  # for the runtime modules (the stub ignores PYTHON* variables)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from ptqd.runtime.conditioning import PipelineSpec, guided_batch, runtime_conditioner  # noqa: E402
from ptqd.runtime.sampler import MinBatch, Sampler  # noqa: E402
from ptqd.runtime.layout import (DENOISER_ROLE, TEXT_ENCODER_ROLE, VAE_DECODER_ROLE,  # noqa: E402
                                 deployment)
from ptqd.runtime.schedule import FoldedSchedule  # noqa: E402

DTYPES = {"float32": np.float32, "int64": np.int64}


class BadRequest(ValueError):
    """What the client got wrong in a request (missing or malformed input, a count out of
    range, an unknown class): answered INVALID_ARGUMENT, the server carries on."""


class BlsModel:
    """Another model of the repository (a denoiser, the VAE decoder, a text encoder), called
    from inside execute(), with its interface (runtime.layout.deployment's io): a per-sample
    scalar input is sent as [batch, 1], as its config's `reshape: []` expects."""

    def __init__(self, model_name: str, inputs: list, outputs: list):
        self.model_name, self.inputs = model_name, inputs
        self.output_names = [name for name, _, _ in outputs]

    def outputs(self, **arrays) -> dict:
        tensors = []
        for name, dtype, dims in self.inputs:
            array = np.ascontiguousarray(arrays[name], dtype=DTYPES[dtype])
            tensors.append(pb_utils.Tensor(name, array if dims else array.reshape(-1, 1)))
        request = pb_utils.InferenceRequest(
            model_name=self.model_name, inputs=tensors, requested_output_names=self.output_names,
            # a TensorRT model answers in GPU memory otherwise, which as_numpy() refuses
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.model_name}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.output_names}

    def run(self, **arrays) -> np.ndarray:
        return self.outputs(**arrays)[self.output_names[0]]

    def __call__(self, *arrays) -> np.ndarray:
        return self.run(**{name: a for (name, _, _), a in zip(self.inputs, arrays)})


def _denoiser(model):
    """A graph model as a sampler engine: (sample, timestep, **conditioning) -> eps."""
    return lambda sample, timestep, **conditioning: model.run(sample=sample, timestep=timestep, **conditioning)


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


def _conditions(request, spec: PipelineSpec) -> list:
    """The request's prompts or class labels ([] = the calibrated defaults)."""
    name = {"text": "prompt", "class": "class_label"}.get(spec.kind)
    tensor = pb_utils.get_input_tensor_by_name(request, name) if name else None
    if tensor is None:
        return []
    values = tensor.as_numpy().reshape(-1)
    if values.size == 0:
        raise ValueError(f"input {name!r} is empty: give at least one, or leave it out for the defaults")
    if spec.kind == "text":
        return [_text(v) for v in values]
    return [int(v) for v in values]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _negative_prompt(request, spec: PipelineSpec):
    """A text model's negative prompt for every image of the request (None: the model's default)."""
    tensor = pb_utils.get_input_tensor_by_name(request, "negative_prompt") if spec.kind == "text" else None
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise ValueError(f"input 'negative_prompt' takes one prompt, got {values.size}")
    return _text(values[0])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.schedule = FoldedSchedule.load(HERE)
        self.spec = PipelineSpec.load(HERE)
        self.graphs = deployment(self.spec, self.schedule.sample_shape, self.schedule.configs)
        # a guided image takes two denoiser samples: chunks of half the denoisers' batch
        self.batch = guided_batch(int(params["batch"]), self.spec)
        self.max_images = int(params["max_images"])
        if params["unets"] == "bls":
            # the interfaces the repository's configs were written from; a TensorRT profile may
            # start above 1 and Triton rejects smaller batches, so every model is padded to it
            min_batch = int(params.get("min_batch", "1"))
            models = {g.name: MinBatch(BlsModel(g.name, *g.io), min_batch) for g in self.graphs}
        else:
            from ptqd.runtime.onnxruntime import OnnxRuntimeGraph

            threads = int(params["threads"])
            models = {g.name: OnnxRuntimeGraph(HERE / "onnx" / g.cpu_graph, threads) for g in self.graphs}
        self._engines(models)

    def _engines(self, models: dict):
        by_role = lambda role: [g for g in self.graphs if g.role == role]
        self.engines = {g.config: _denoiser(models[g.name]) for g in by_role(DENOISER_ROLE)}
        self.text_encoders = {g.name: models[g.name] for g in by_role(TEXT_ENCODER_ROLE)}
        self.decoder = next((models[g.name] for g in by_role(VAE_DECODER_ROLE)), None)

    def _read(self, request) -> tuple:
        """(seed, num, first index, conditions, negative prompt) of one request; BadRequest
        names what the client got wrong."""
        try:
            seed = _scalar(request, "seed")
            num = _scalar(request, "num_images")
            first = _scalar(request, "first_index", 0)
            if seed < 0 or first < 0:
                raise ValueError("seed and first_index must be >= 0")
            if not 1 <= num <= self.max_images:
                raise ValueError(f"num_images must be in 1..{self.max_images}, got {num}")
            conditions = self.spec.check_conditions(_conditions(request, self.spec))
            return seed, num, first, conditions, _negative_prompt(request, self.spec)
        except ValueError as exc:   # what the checks raise; UnicodeDecodeError is one too
            raise BadRequest(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None

    def _run(self, request):
        seed, num, first, conditions, negative = self._read(request)
        conditioner = runtime_conditioner(self.spec, conditions, HERE, self.text_encoders, negative)
        sampler = Sampler(self.schedule, self.engines, self.batch, conditioner, self.decoder)
        images = sampler.generate(num, seed, first_index=first)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", images)])

    def execute(self, requests):
        responses = []
        for request in requests:
            # one bad request must not take the others down; the client's mistakes are
            # INVALID_ARGUMENT (HTTP 400), anything else is the server's (INTERNAL, HTTP 500).
            # (pb_utils.TritonError exists once the stub runs the model, not at import.)
            try:
                responses.append(self._run(request))
            except BadRequest as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
