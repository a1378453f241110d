"""TensorRT engines: one strongly typed engine per bit configuration, built from the
TensorRT-flavour QDQ graph, with its metadata beside it.

`tensorrt` is imported here only, lazily: the package and every other backend work without
it. Calls follow TensorRT 10.x and 11.x (TRT_API.md): no precision builder flags (11 has
none; precision comes from the graph's Q/DQ), the STRONGLY_TYPED flag computed from the enum
(its value differs between 10 and 11), a shared timing cache, one optimization profile.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptqd.engines.profiles import BatchProfile
from ptqd.errors import UserError
from ptqd.output import file_sha256

MISSING = ("TensorRT is not installed here (its wheels come from NVIDIA's package index); "
           "build the engines in NVIDIA's TensorRT container with OUT/engines/build_engines.sh")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(MISSING) from None
    return trt


def tensorrt_version() -> str | None:
    try:
        return import_tensorrt().__version__
    except UserError:
        return None


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except UserError:
        return False
    return True


@dataclass(frozen=True)
class BuildSettings:
    profile: BatchProfile
    optimization_level: int = 3
    workspace_mib: int = 4096


def strongly_typed_flag(trt) -> int:
    # 10.x: STRONGLY_TYPED = 1; 11.x: = 0 (deprecated, strong typing is always on). A literal
    # would set PREFER_JIT_PYTHON_PLUGINS on 11, so compute it from the enum.
    member = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if member is None else 1 << int(member)


def gpu_description() -> dict:
    """Name and compute capability of GPU 0 (TensorRT's API has no call for them)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    return {"name": "unknown", "compute_capability": "unknown"}


class EngineBuilder:
    """Builds engines one configuration after another, sharing one timing cache."""

    def __init__(self, settings: BuildSettings, timing_cache: Path, trt=None):
        self.trt = trt or import_tensorrt()
        self.settings = settings
        self.timing_cache = timing_cache
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)

    def build(self, onnx_path: Path, plan_path: Path, config: str, shapes: dict) -> dict:
        """shapes: per input (min, opt, max), from profiles.input_shapes or batched_shapes."""
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(strongly_typed_flag(trt))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
        cfg = builder.create_builder_config()
        cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.settings.workspace_mib << 20)
        cfg.builder_optimization_level = self.settings.optimization_level
        cache_bytes = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
        cfg.set_timing_cache(cfg.create_timing_cache(cache_bytes), ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if cfg.add_optimization_profile(profile) < 0:
            raise RuntimeError(f"TensorRT rejected the optimization profile {shapes}")
        plan = builder.build_serialized_network(network, cfg)
        if not plan:
            raise RuntimeError(f"TensorRT failed to build {plan_path.name} (see its log above)")
        plan_path.write_bytes(bytes(plan))
        self.timing_cache.write_bytes(bytes(cfg.get_timing_cache().serialize()))
        meta = engine_metadata(trt.__version__, onnx_path, config, self.settings, shapes)
        metadata_path(plan_path).write_text(json.dumps(meta, indent=1) + "\n")
        return meta


def metadata_path(plan_path: Path) -> Path:
    return plan_path.with_suffix(".json")


def engine_metadata(trt_version: str, onnx_path: Path, config: str, settings: BuildSettings,
                    shapes: dict) -> dict:
    # An engine runs only with the TensorRT version and GPU architecture that built it.
    return {"format_version": 1, "config": config, "tensorrt_version": trt_version,
            "gpu": gpu_description(), "host": platform.node(), "source_onnx": onnx_path.name,
            "source_onnx_sha256": file_sha256(onnx_path), "batch_profile": str(settings.profile),
            "profile_shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
            "builder_optimization_level": settings.optimization_level, "strongly_typed": True}


class TensorRTGraph:
    """A built plan as a numpy callable: positional inputs in the engine's input order, or
    keyword arrays through run(); one output; device buffers via torch. The VAE decoder and
    text encoder run through this, the UNets through TensorRTUNet."""

    def __init__(self, plan_path: Path, trt=None):
        import torch

        self.trt = trt or import_tensorrt()
        self.torch = torch
        runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise UserError(f"{plan_path} does not load in TensorRT {self.trt.__version__}: "
                            "engines are specific to the TensorRT version and GPU that built them")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) != mode)
        lo, _, hi = self.engine.get_tensor_profile_shape(self.inputs[0], 0)
        self.batch_range = (lo[0], hi[0])

    def run(self, **arrays) -> np.ndarray:
        torch = self.torch
        batch = len(next(iter(arrays.values())))
        if not self.batch_range[0] <= batch <= self.batch_range[1]:
            raise UserError(f"batch {batch} is outside the engine's profile "
                            f"{self.batch_range[0]}..{self.batch_range[1]} (rebuild with --batch)")
        inputs = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])).cuda() for k in self.inputs}
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device="cuda")
        self.context.set_tensor_address(self.output, out.data_ptr())
        if not self.context.execute_async_v3(stream_handle=self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return out.cpu().numpy()

    def __call__(self, *arrays):
        return self.run(**dict(zip(self.inputs, arrays)))


class TensorRTUNet(TensorRTGraph):
    """A UNet plan as a sampler engine; conditioning inputs (encoder_hidden_states,
    class_labels) pass as keyword arrays."""

    def __call__(self, sample, timestep, **conditioning):
        return self.run(sample=sample, timestep=timestep, **conditioning)
