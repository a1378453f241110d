"""TensorRT engines: one strongly typed engine per bit configuration, built from the
TensorRT-flavour QDQ graph, with its metadata (and measured latency) beside it; and the
runtime that samples on them: EngineSet (one stream, one activation buffer shared by every
context, optional CUDA graphs) and the numpy callables TensorRTGraph / TensorRTUNet.

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

import click
import numpy as np

from ptqd.engines.profiles import BatchProfile
from ptqd.engines.timing import timing_record, write_timing
from ptqd.errors import UserError
from ptqd.output import graph_sha256

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

    def __init__(self, settings: BuildSettings, timing_cache: Path, trt=None, cuda=None):
        self.trt = trt or import_tensorrt()
        self.settings = settings
        self.timing_cache = timing_cache
        self.cuda = cuda   # None: TorchCuda, made when a plan is timed
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
        self.time(plan_path, config, shapes)
        return meta

    def time(self, plan_path: Path, config: str, shapes: dict, warmup: int = 10,
             iterations: int = 50) -> dict | None:
        """The plan's median GPU time per call at the profile's opt shapes (CUDA graph replays
        timed with CUDA events, as build_engines.sh times with trtexec), written beside it as
        <stem>.timing.json; None, said in one line, where it cannot run here."""
        opt = {name: per[1] for name, per in shapes.items()}
        try:
            engines = EngineSet(cuda_graph=True, trt=self.trt, cuda=self.cuda)
            graph = engines.load(plan_path)
            times = graph.time_ms(timing_inputs(opt, graph.dtypes), warmup, iterations)
        except (RuntimeError, UserError) as exc:
            click.echo(f"[engines] {plan_path.name}: not timed ({exc})", err=True)
            return None
        batch = next(iter(opt.values()))[0]
        record = timing_record(plan_path.stem, config, float(np.median(times)), batch, "tensorrt-python",
                               self.trt.__version__, gpu_description()["name"], cuda_graph=True)
        write_timing(plan_path.parent, plan_path.stem, record)
        click.echo(f"[engines] {plan_path.name} ({config}): median {record['median_ms']:.4g} ms per call "
                   f"at batch {batch} ({iterations} CUDA-graph replays, CUDA events)")
        return record


def timing_inputs(shapes: dict, dtypes: dict) -> dict:
    """Inputs to time an engine on: normal floats; zeros for integer inputs, which index
    embedding tables (any valid index costs the same)."""
    rng = np.random.default_rng(0)
    return {name: (np.zeros(shape, dtypes[name]) if np.issubdtype(dtypes[name], np.integer)
                   else rng.standard_normal(shape).astype(dtypes[name]))
            for name, shape in shapes.items()}


def metadata_path(plan_path: Path) -> Path:
    return plan_path.with_suffix(".json")


def engine_metadata(trt_version: str, onnx_path: Path, config: str, settings: BuildSettings,
                    shapes: dict) -> dict:
    # An engine runs only with the TensorRT version and GPU architecture that built it.
    return {"format_version": 1, "config": config, "tensorrt_version": trt_version,
            "gpu": gpu_description(), "host": platform.node(), "source_onnx": onnx_path.name,
            "source_onnx_sha256": graph_sha256(onnx_path), "batch_profile": str(settings.profile),
            "profile_shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
            "builder_optimization_level": settings.optimization_level, "strongly_typed": True}


class TorchCuda:
    """The CUDA the TensorRT runtime needs (one stream, device buffers, copies, CUDA graphs,
    event timing), all through torch and only here, so that tests can stand in for it."""

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--backend tensorrt needs a CUDA GPU, and torch sees none here")
        self.torch = torch
        # TensorRT: enqueue on a stream of our own, not the default stream (NvInferRuntime.h)
        self.stream = torch.cuda.Stream()

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream

    def empty(self, shape: tuple, dtype: np.dtype):
        torch_dtype = self.torch.from_numpy(np.empty(0, dtype)).dtype
        return self.torch.empty(tuple(shape), dtype=torch_dtype, device="cuda")

    def address(self, buffer) -> int:
        return buffer.data_ptr()

    def upload(self, buffer, array: np.ndarray) -> None:
        with self.torch.cuda.stream(self.stream):
            buffer.copy_(self.torch.from_numpy(array))

    def download(self, buffer) -> np.ndarray:
        with self.torch.cuda.stream(self.stream):
            return buffer.cpu().numpy()   # waits for the stream's work

    def capture(self, enqueue):
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, stream=self.stream):
            enqueue()
        return graph

    def replay(self, graph) -> None:
        with self.torch.cuda.stream(self.stream):
            graph.replay()

    def time_ms(self, launch, warmup: int, iterations: int) -> list[float]:
        """GPU milliseconds of each of `iterations` launches, after `warmup` untimed ones."""
        for _ in range(warmup):
            launch()
        pairs = []
        for _ in range(iterations):
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record(self.stream)
            launch()
            end.record(self.stream)
            pairs.append((start, end))
        self.stream.synchronize()
        return [start.elapsed_time(end) for start, end in pairs]


def context_memory_size(engine) -> int:
    # TensorRT 10.1+ (and 11, which removed the V1 property): device_memory_size_v2; 10.0 has only V1
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


def give_context_memory(context, address: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):   # 10.1+: setDeviceMemoryV2 checks the size
        context.set_device_memory(address, size)
    else:                                       # 10.0: the address alone
        context.device_memory = address


class EngineSet:
    """The engines one sampler runs (a UNet per configuration, the VAE decoder, the text
    encoder), one after another on one CUDA stream, sharing one activation buffer sized to the
    largest engine's need, as demoDiffusion does. Contexts are USER_MANAGED: TensorRT allocates
    no activation memory of its own, and a buffer may serve several contexts as long as they do
    not run at the same time (pyCoreDoc.h), which one stream and a sync per call guarantee.

    cuda_graph: each engine captures its work once per input shape (after one eager run, as
    demoDiffusion and trtexec do) and replays it; the graph bakes in the buffers' addresses, so
    inputs are copied into per-shape buffers that stay put."""

    def __init__(self, cuda_graph: bool = False, trt=None, cuda=None):
        self.trt = trt or import_tensorrt()
        self.cuda = cuda or TorchCuda()
        self.cuda_graph = cuda_graph
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.members: list[TensorRTGraph] = []
        self.memory = None          # the shared buffer, allocated at the first run
        self.memory_bytes = 0

    def load(self, plan_path: Path, kind: type | None = None) -> "TensorRTGraph":
        engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if engine is None:
            raise UserError(f"{plan_path} does not load in TensorRT {self.trt.__version__}: "
                            "engines are specific to the TensorRT version and GPU that built them")
        member = (kind or TensorRTGraph)(self, engine)
        self.members.append(member)
        return member

    def share_memory(self, member: "TensorRTGraph") -> None:
        """Before `member` runs: the buffer covers every loaded engine and `member` holds it."""
        need = max(context_memory_size(m.engine) for m in self.members)
        if self.memory is None or self.memory_bytes < need:
            # allocated lazily so that it is sized once, after the sampler has loaded them all;
            # an engine loaded later that needs more gets a new buffer, and every captured graph
            # (which baked in the old address) is captured again
            self.memory = None
            # TensorRT wants it 256-byte aligned (pyCoreDoc.h); torch's allocator aligns to 512
            self.memory_bytes = max(need, 256)   # a 0-byte buffer has no address
            self.memory = self.cuda.empty((self.memory_bytes,), np.dtype(np.uint8))
            for m in self.members:
                m.memory_address = None
                m.forget_graphs()
        address = self.cuda.address(self.memory)
        if member.memory_address != address:
            give_context_memory(member.context, address, self.memory_bytes)
            member.memory_address = address


@dataclass
class _Binding:
    """One input shape's device buffers (inputs and output), and its CUDA graph once captured."""
    shapes: tuple
    buffers: dict
    graph: object = None
    eager: bool = False   # its CUDA graph capture failed: always run eagerly


class TensorRTGraph:
    """A built plan as a numpy callable: positional inputs in the engine's input order, or
    keyword arrays through run() (the first output) or outputs() (all of them, by name). The
    VAE decoder and text encoders run through this, the denoisers through TensorRTUNet;
    EngineSet.load makes them."""

    def __init__(self, engines: EngineSet, engine):
        trt = engines.trt
        self.engines, self.engine = engines, engine
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]
        self.output = self.output_names[0]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        lo, _, hi = engine.get_tensor_profile_shape(self.inputs[0], 0)
        self.batch_range = (lo[0], hi[0])
        self.memory_address = None
        self._bindings: dict[tuple, _Binding] = {}
        self._bound: tuple | None = None   # the shapes the context is set to

    def forget_graphs(self) -> None:
        for binding in self._bindings.values():
            binding.graph = None

    def _bind(self, shapes: tuple) -> _Binding:
        cuda = self.engines.cuda
        binding = self._bindings.get(shapes)
        if binding is None:
            buffers = {n: cuda.empty(s, self.dtypes[n]) for n, s in zip(self.inputs, shapes)}
            binding = self._bindings[shapes] = _Binding(shapes, buffers)
            self._bound = None
        if self._bound != shapes:
            for name, shape in zip(self.inputs, shapes):
                # False when a shape lies outside the engine's profile (not only its batch)
                if not self.context.set_input_shape(name, shape):
                    lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
                    raise UserError(f"input {name} of shape {list(shape)} is outside the engine's profile "
                                    f"{list(lo)}..{list(hi)} (rebuild for these shapes)")
            for output in self.output_names:
                if output not in binding.buffers:   # its shape is known once the inputs' are
                    out_shape = tuple(self.context.get_tensor_shape(output))
                    binding.buffers[output] = cuda.empty(out_shape, self.dtypes[output])
            for name, buffer in binding.buffers.items():
                self.context.set_tensor_address(name, cuda.address(buffer))
            self._bound = shapes
        return binding

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(stream_handle=self.engines.cuda.stream_handle):
            raise RuntimeError("TensorRT execution failed")

    def _launch(self, binding: _Binding) -> None:
        """This binding's work on the stream: the graph's replay, else an eager run, after which
        the graph is captured (the eager run is this call's result; capture runs nothing)."""
        if binding.graph is not None:
            self.engines.cuda.replay(binding.graph)
            return
        self._enqueue()
        if self.engines.cuda_graph and not binding.eager:
            try:
                binding.graph = self.engines.cuda.capture(self._enqueue)
            except RuntimeError as exc:
                # an engine may hold work that CUDA graphs cannot capture (trtexec falls back
                # the same way): this shape runs eagerly from now on
                binding.eager = True
                click.echo(f"[tensorrt] CUDA graph capture failed for shapes {list(binding.shapes)} "
                           f"({exc}); running without a graph", err=True)

    def _prepare(self, arrays: dict) -> _Binding:
        batch = len(next(iter(arrays.values())))
        if not self.batch_range[0] <= batch <= self.batch_range[1]:
            raise UserError(f"batch {batch} is outside the engine's profile "
                            f"{self.batch_range[0]}..{self.batch_range[1]} (rebuild with --batch)")
        host = {n: np.ascontiguousarray(arrays[n], dtype=self.dtypes[n]) for n in self.inputs}
        self.engines.share_memory(self)
        binding = self._bind(tuple(host[n].shape for n in self.inputs))
        for name in self.inputs:
            self.engines.cuda.upload(binding.buffers[name], host[name])
        return binding

    def run(self, **arrays) -> np.ndarray:
        binding = self._prepare(arrays)
        self._launch(binding)
        return self.engines.cuda.download(binding.buffers[self.output])

    def outputs(self, **arrays) -> dict[str, np.ndarray]:
        """Every output by name (an SDXL text encoder's hidden states and pooled embedding)."""
        binding = self._prepare(arrays)
        self._launch(binding)
        return {name: self.engines.cuda.download(binding.buffers[name]) for name in self.output_names}

    def time_ms(self, arrays: dict, warmup: int = 10, iterations: int = 50) -> list[float]:
        """GPU time of each of `iterations` calls on these inputs (graph replays where the set
        captures graphs), after one call that binds and captures and `warmup` more."""
        binding = self._prepare(arrays)
        self._launch(binding)
        return self.engines.cuda.time_ms(lambda: self._launch(binding), warmup, iterations)

    def __call__(self, *arrays):
        return self.run(**dict(zip(self.inputs, arrays)))


class TensorRTUNet(TensorRTGraph):
    """A denoiser plan (UNet or transformer) as a sampler engine; conditioning inputs
    (encoder_hidden_states, class_labels, text_embeds, ...) pass as keyword arrays."""

    def __call__(self, sample, timestep, **conditioning):
        return self.run(sample=sample, timestep=timestep, **conditioning)
