"""config.pbtxt for each model of the Triton repository.

Configs are built as Triton's own protobuf message (tritonclient ships the schema as
model_config_pb2), so a misspelt field or a bad enum fails here, and each written text is
parsed back before it lands, which is what the server will do with it.
"""
from __future__ import annotations

import json
from pathlib import Path

from ptqd.engines.profiles import BatchProfile
from ptqd.runtime.layout import Interface, Tensor

CONFIG_FILE = "config.pbtxt"
SAMPLER_INPUTS = {"seed": "TYPE_INT64", "num_images": "TYPE_INT32", "first_index": "TYPE_INT64"}
SAMPLER_OUTPUT = "images"
# conditional models: what a request conditions its images on (image j uses item j % count),
# per conditioning kind; a text model also takes an optional negative prompt (one, for every image)
CONDITION_INPUTS = {"text": ("prompt", "TYPE_STRING"), "class": ("class_label", "TYPE_INT64")}
NEGATIVE_PROMPT_INPUT = "negative_prompt"
# Requests queue this long (µs) so concurrent samplers at the same step share one UNet batch.
QUEUE_DELAY_US = 2000


def _schema():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        from ptqd.errors import UserError

        raise UserError("the Triton repository needs tritonclient, a ptqd dependency: reinstall ptqd (make install)") from None
    return model_config_pb2, text_format


def parse_config(text: str):
    """The ModelConfig message Triton reads from `text`; raises ParseError on what it rejects."""
    pb, text_format = _schema()
    return text_format.Parse(text, pb.ModelConfig())


def write_config(model_dir: Path, config) -> Path:
    _, text_format = _schema()
    text = text_format.MessageToString(config)
    if parse_config(text) != config:
        raise RuntimeError(f"{model_dir.name}: config.pbtxt does not read back as written")
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / CONFIG_FILE
    path.write_text(text)
    return path


TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


def _io(config, inputs: list[Tensor], outputs: list[Tensor]) -> None:
    pb, _ = _schema()
    for group, tensors in ((config.input, inputs), (config.output, outputs)):
        for name, dtype, dims in tensors:
            tensor = group.add(name=name, data_type=pb.DataType.Value(TRITON_TYPES[dtype]), dims=dims or [1])
            if not dims:
                tensor.reshape.SetInParent()


def _batched(config, profile: BatchProfile) -> None:
    config.max_batch_size = profile.max
    config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    if profile.opt < profile.max:
        config.dynamic_batching.preferred_batch_size.extend([profile.opt, profile.max])


def tensorrt_model(name: str, io: Interface, profile: BatchProfile):
    """A TensorRT engine served by Triton's TensorRT backend from 1/model.plan."""
    pb, _ = _schema()
    config = pb.ModelConfig(name=name, platform="tensorrt_plan", default_model_filename="model.plan")
    _io(config, *io)
    _batched(config, profile)
    config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value("KIND_GPU"), count=1, profile=["0"])
    return config


def _parameters(config, values: dict[str, str]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def onnxruntime_model(name: str, io: Interface, profile: BatchProfile, threads: int,
                      index_rows: dict[str, int] | None = None):
    """A graph run by onnxruntime inside a Python-backend model (1/model.onnx): the TensorRT
    model's stand-in where Triton has no TensorRT backend, called the same way. index_rows:
    per integer input, the rows of the embedding table it indexes (a request outside them is
    refused as the client's error)."""
    pb, _ = _schema()
    config = pb.ModelConfig(name=name, backend="python")
    _io(config, *io)
    _batched(config, profile)
    config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"), count=1)
    _parameters(config, {"graph": "model.onnx", "threads": threads, "index_rows": json.dumps(index_rows or {})})
    return config


def sampler(name: str, image_shape: list[int], instances: int, parameters: dict[str, str],
            kind: str = "unconditional"):
    """The whole pipeline: (seed, num_images[, first_index][, prompt [, negative_prompt] |
    class_label]) -> images [num, C, H, W] in [0, 1]; a conditional model's conditions are
    optional, any count."""
    pb, _ = _schema()
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    for input_name, dtype in SAMPLER_INPUTS.items():
        config.input.add(name=input_name, data_type=pb.DataType.Value(dtype), dims=[1],
                         optional=input_name == "first_index")
    if kind in CONDITION_INPUTS:
        condition_input, dtype = CONDITION_INPUTS[kind]
        config.input.add(name=condition_input, data_type=pb.DataType.Value(dtype), dims=[-1], optional=True)
    if kind == "text":
        config.input.add(name=NEGATIVE_PROMPT_INPUT, data_type=pb.DataType.Value("TYPE_STRING"), dims=[1],
                         optional=True)
    config.output.add(name=SAMPLER_OUTPUT, data_type=pb.DataType.Value("TYPE_FP32"),
                      dims=[-1, *image_shape])
    config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"), count=instances)
    _parameters(config, parameters)
    return config


def type_name(data_type: int) -> str:
    """The DataType enum value's name ("TYPE_FP32")."""
    pb, _ = _schema()
    return pb.DataType.Name(data_type)
