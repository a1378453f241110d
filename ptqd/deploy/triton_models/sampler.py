"""Triton Python-backend model: the whole pipeline around PTQD's denoising loop: encode the
prompt (tokenizer + text encoder) or class label, denoise over the folded schedule with
classifier-free guidance, decode the latents (VAE decoder).

Request: seed (INT64 [1]), num_images (INT32 [1]), optional first_index (INT64 [1]); for a
text model optional prompt (BYTES [n]), for a class-conditional one optional class_label
(INT64 [n]): image i of the seed uses item i % n (default: the prompts/classes it was
calibrated with).
Response: images (FP32 [num, C, H, W] in [0, 1]); image i of a seed is the same image that
`ptqd sample OUT --backend onnxruntime --seed S` (with the same prompts or classes) writes at
index i (bit for bit with the in-process CPU-fast graphs), whatever the batch.

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

from ptqd.runtime.conditioning import PipelineSpec, guided_batch, runtime_conditioner  # noqa: E402
from ptqd.runtime.sampler import MinBatch, Sampler  # noqa: E402
from ptqd.runtime.layout import (TEXT_ENCODER_GRAPH, TOKENIZER_DIR, VAE_DECODER_GRAPH,  # noqa: E402
                                       graph_path, text_encoder_io, unet_io, vae_decoder_io)
from ptqd.runtime.schedule import FoldedSchedule  # noqa: E402

DTYPES = {"float32": np.float32, "int64": np.int64}


class BlsModel:
    """Another model of the repository (a UNet, the VAE decoder, the text encoder), called
    from inside execute(), with its interface (runtime.layout's *_io): a per-sample scalar input
    is sent as [batch, 1], as its config's `reshape: []` expects."""

    def __init__(self, model_name: str, inputs: list, outputs: list):
        self.model_name, self.inputs, self.output = model_name, inputs, outputs[0][0]

    def run(self, **arrays) -> np.ndarray:
        tensors = []
        for name, dtype, dims in self.inputs:
            array = np.ascontiguousarray(arrays[name], dtype=DTYPES[dtype])
            tensors.append(pb_utils.Tensor(name, array if dims else array.reshape(-1, 1)))
        request = pb_utils.InferenceRequest(
            model_name=self.model_name, inputs=tensors, requested_output_names=[self.output],
            # a TensorRT model answers in GPU memory otherwise, which as_numpy() refuses
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.model_name}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, self.output).as_numpy()

    def __call__(self, *arrays) -> np.ndarray:
        return self.run(**{name: a for (name, _, _), a in zip(self.inputs, arrays)})


class BlsUNet(BlsModel):
    def __call__(self, sample, timestep, **conditioning):
        return self.run(sample=sample, timestep=timestep, **conditioning)


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
    if spec.kind == "text":
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    return [int(v) for v in values]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.schedule = FoldedSchedule.load(HERE)
        self.spec = PipelineSpec.load(HERE)
        # a guided image takes two UNet samples: chunks of half the UNets' batch
        self.batch = guided_batch(int(params["batch"]), self.spec)
        self.max_images = int(params["max_images"])
        if params["unets"] == "bls":
            self._bls_engines(int(params.get("min_batch", "1")))
        else:
            self._in_process_engines(int(params["threads"]))

    def _bls_engines(self, min_batch: int):
        shape, spec = self.schedule.sample_shape, self.spec
        # the interfaces the repository's configs were written from; a TensorRT profile may
        # start above 1 and Triton rejects smaller batches, so every model is padded to it
        unet = unet_io(shape, spec.unet_inputs)
        self.engines = {cfg: MinBatch(BlsUNet(f"unet_{cfg}", *unet), min_batch) for cfg in self.schedule.configs}
        self.decoder = (MinBatch(BlsModel("vae_decoder", *vae_decoder_io(shape, spec.image_shape)), min_batch)
                        if spec.latent else None)
        self.text_encoder = (MinBatch(BlsModel("text_encoder", *text_encoder_io(spec.max_length,
                                                                                spec.unet_inputs[0]["dims"])),
                                      min_batch) if spec.kind == "text" else None)

    def _in_process_engines(self, threads: int):
        from ptqd.runtime.onnxruntime import OnnxRuntimeGraph, OnnxRuntimeUNet

        self.engines = {cfg: OnnxRuntimeUNet(graph_path(HERE / "onnx", cfg, "cpu-fast"), threads)
                        for cfg in self.schedule.configs}
        self.decoder = OnnxRuntimeGraph(HERE / "onnx" / VAE_DECODER_GRAPH, threads) if self.spec.latent else None
        self.text_encoder = (OnnxRuntimeGraph(HERE / "onnx" / TEXT_ENCODER_GRAPH, threads)
                             if self.spec.kind == "text" else None)

    def _run(self, request):
        seed = _scalar(request, "seed")
        num = _scalar(request, "num_images")
        first = _scalar(request, "first_index", 0)
        if seed < 0 or first < 0:
            raise ValueError("seed and first_index must be >= 0")
        if not 1 <= num <= self.max_images:
            raise ValueError(f"num_images must be in 1..{self.max_images}, got {num}")
        conditioner = runtime_conditioner(self.spec, _conditions(request, self.spec), HERE / TOKENIZER_DIR,
                                          self.text_encoder)
        sampler = Sampler(self.schedule, self.engines, self.batch, conditioner, self.decoder)
        images = sampler.generate(num, seed, first_index=first)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", images)])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._run(request))
            except Exception as exc:  # one bad request must not take the others down
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
