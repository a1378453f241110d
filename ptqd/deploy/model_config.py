"""config.pbtxt for each model of the Triton repository.

Configs are built as Triton's own protobuf message (tritonclient ships the schema as
model_config_pb2), so a misspelt field or a bad enum fails here, and each written text is
parsed back before it lands, which is what the server will do with it.
"""
from __future__ import annotations

from pathlib import Path

from ptqd.engines.profiles import BatchProfile
from ptqd.exporter.graph_files import INPUT_NAMES, OUTPUT_NAME

CONFIG_FILE = "config.pbtxt"
SAMPLER_INPUTS = {"seed": "TYPE_INT64", "num_images": "TYPE_INT32", "first_index": "TYPE_INT64"}
SAMPLER_OUTPUT = "images"
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


def _unet_io(config, sample_shape: list[int]) -> None:
    pb, _ = _schema()
    fp32 = pb.DataType.Value("TYPE_FP32")
    config.input.add(name=INPUT_NAMES[0], data_type=fp32, dims=list(sample_shape))
    # The graph's timestep is [batch]; Triton's per-request shape must have a dim, so clients
    # send [batch, 1] and Triton hands the engine [batch].
    timestep = config.input.add(name=INPUT_NAMES[1], data_type=fp32, dims=[1])
    timestep.reshape.SetInParent()
    config.output.add(name=OUTPUT_NAME, data_type=fp32, dims=list(sample_shape))


def _batched(config, profile: BatchProfile) -> None:
    config.max_batch_size = profile.max
    config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    if profile.opt < profile.max:
        config.dynamic_batching.preferred_batch_size.extend([profile.opt, profile.max])


def unet_tensorrt(name: str, sample_shape: list[int], profile: BatchProfile):
    """A UNet engine served by Triton's TensorRT backend from 1/model.plan."""
    pb, _ = _schema()
    config = pb.ModelConfig(name=name, platform="tensorrt_plan", default_model_filename="model.plan")
    _unet_io(config, sample_shape)
    _batched(config, profile)
    config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value("KIND_GPU"), count=1, profile=["0"])
    return config


def _parameters(config, values: dict[str, str]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def unet_onnxruntime(name: str, sample_shape: list[int], profile: BatchProfile, threads: int):
    """A UNet graph run by onnxruntime inside a Python-backend model (1/model.onnx): the
    TensorRT model's stand-in where Triton has no TensorRT backend, called the same way."""
    pb, _ = _schema()
    config = pb.ModelConfig(name=name, backend="python")
    _unet_io(config, sample_shape)
    _batched(config, profile)
    config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"), count=1)
    _parameters(config, {"graph": "model.onnx", "threads": threads})
    return config


def sampler(name: str, sample_shape: list[int], instances: int, parameters: dict[str, str]):
    """The denoising loop: (seed, num_images[, first_index]) -> images [num, C, H, W] in [0, 1]."""
    pb, _ = _schema()
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    for input_name, dtype in SAMPLER_INPUTS.items():
        config.input.add(name=input_name, data_type=pb.DataType.Value(dtype), dims=[1],
                         optional=input_name == "first_index")
    config.output.add(name=SAMPLER_OUTPUT, data_type=pb.DataType.Value("TYPE_FP32"),
                      dims=[-1, *sample_shape])
    config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"), count=instances)
    _parameters(config, parameters)
    return config
