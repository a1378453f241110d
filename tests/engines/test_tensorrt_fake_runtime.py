"""The TensorRT runtime (EngineSet, TensorRTGraph) around a fake `tensorrt` module and a fake
CUDA layer: no TensorRT or GPU can run here, so these tests check what ptqd asks of them (one
shared activation buffer, USER_MANAGED contexts, CUDA graphs per shape) and name the fake."""
from __future__ import annotations

import json
import types
from dataclasses import dataclass

import numpy as np
import pytest

from ptqd.engines.tensorrt import EngineSet, TensorRTUNet
from ptqd.errors import UserError

UNET_IO = {"inputs": [["sample", "float32", [-1, 1, 16, 16]], ["timestep", "float32", [-1]]],
           "output": ["noise_pred", "float32", [-1, 1, 16, 16]]}
DECODER_IO = {"inputs": [["latents", "float32", [-1, 4, 8, 8]]], "output": ["images", "float32", [-1, 3, 16, 16]]}
ENCODER_IO = {"inputs": [["input_ids", "int64", [-1, 16]]], "output": ["encoder_hidden_states", "float32", [-1, 16, 32]]}


def fake_plan(io: dict, memory: int, batch=(1, 4, 8)) -> bytes:
    """A fake plan: what the fake runtime needs to know about the engine, as JSON."""
    return json.dumps({**io, "memory": memory, "batch": list(batch)}).encode()


def fake_output(inputs: list[np.ndarray], out_shape: tuple) -> np.ndarray:
    """What every fake engine computes: half its first input (or that input's row mean, where
    the output has another shape) plus a hundredth of every other input's row mean."""
    first = inputs[0].astype(np.float32)
    rows = first.reshape(len(first), -1)
    out = 0.5 * first if first.shape == out_shape else np.broadcast_to(
        rows.mean(1).reshape(-1, *[1] * (len(out_shape) - 1)), out_shape).astype(np.float32)
    for other in inputs[1:]:
        out = out + 0.01 * other.reshape(len(other), -1).astype(np.float32).mean(1).reshape(-1, *[1] * (len(out_shape) - 1))
    return out.astype(np.float32)


@dataclass
class FakeBuffer:
    address: int
    array: np.ndarray


class FakeCuda:
    """Device memory as numpy arrays at made-up addresses; a captured graph is the list of
    launches recorded during capture (each bound to the addresses it was enqueued with)."""
    stream_handle = 0x5EED

    def __init__(self):
        self.memory: dict[int, np.ndarray] = {}
        self.allocations: list[tuple] = []
        self.next_address = 0x10000
        self.recording: list | None = None
        self.captures = self.replays = 0

    def empty(self, shape, dtype):
        array = np.zeros(tuple(shape), dtype)
        address = self.next_address
        self.next_address += array.nbytes + 256
        self.memory[address] = array
        self.allocations.append((tuple(shape), np.dtype(dtype)))
        return FakeBuffer(address, array)

    def address(self, buffer):
        return buffer.address

    def upload(self, buffer, array):
        buffer.array[...] = array

    def download(self, buffer):
        return buffer.array.copy()

    fail_capture = False   # as CUDA does for work it cannot capture

    def capture(self, enqueue):
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.recording = []
        enqueue()
        graph, self.recording = self.recording, None
        self.captures += 1
        return graph

    def replay(self, graph):
        self.replays += 1
        for launch in graph:
            launch()

    def time_ms(self, launch, warmup, iterations):
        for _ in range(warmup + iterations):
            launch()
        self.timed = (warmup, iterations)
        return [float(i + 1) for i in range(iterations)]

    def memory_buffers(self):
        return [a for a in self.allocations if a[1] == np.uint8]


class FakeContext:
    def __init__(self, engine, strategy, cuda):
        self.engine, self.strategy, self.cuda = engine, strategy, cuda
        self.shapes, self.addresses = {}, {}
        self.memory = None
        self.eager_runs = 0

    def set_device_memory(self, address, size):
        assert size >= self.engine.need, "TensorRT rejects a buffer below device_memory_size_v2"
        self.memory = (address, size)

    def set_input_shape(self, name, shape):
        """As TensorRT's: False (nothing set) for a shape outside the profile, in any dim."""
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        dims = self.engine.doc["output"][2]
        return (self.shapes[self.engine.inputs[0]][0], *dims[1:])

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute_async_v3(self, stream_handle):
        assert stream_handle == self.cuda.stream_handle
        # a USER_MANAGED context without memory would fault on a real GPU
        assert self.memory is not None, "executed before set_device_memory"
        addresses, out_name = dict(self.addresses), self.engine.output

        def launch():
            inputs = [self.cuda.memory[addresses[n]] for n in self.engine.inputs]
            out = self.cuda.memory[addresses[out_name]]
            out[...] = fake_output(inputs, out.shape)

        if self.cuda.recording is not None:
            self.cuda.recording.append(launch)
        else:
            self.eager_runs += 1
            launch()
        return True


class FakeContextV10_0(FakeContext):
    """TensorRT 10.0: no set_device_memory, only the write-only device_memory property."""
    set_device_memory = property()   # hasattr() is False, as on 10.0's bindings

    def __setattr__(self, name, value):
        if name == "device_memory":
            name, value = "memory", (value, None)
        object.__setattr__(self, name, value)


class FakeEngine:
    def __init__(self, doc, trt):
        self.doc, self.trt = doc, trt
        self.inputs = [i[0] for i in doc["inputs"]]
        self.output = doc["output"][0]
        self.io = {i[0]: i for i in doc["inputs"] + [doc["output"]]}
        self.need = doc["memory"]
        self.num_io_tensors = len(self.io)
        if trt.v10_0:
            self.device_memory_size = self.need
        else:
            self.device_memory_size_v2 = self.need

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name in self.inputs else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return np.dtype(self.io[name][1])

    def get_tensor_profile_shape(self, name, profile):
        return [(b, *self.io[name][2][1:]) for b in self.doc["batch"]]

    def create_execution_context(self, strategy=None):
        context = (FakeContextV10_0 if self.trt.v10_0 else FakeContext)(self, strategy, self.trt.cuda)
        self.trt.contexts.append(context)
        return context


def fake_runtime_trt(cuda: FakeCuda, version: str = "11.1.0.106", v10_0: bool = False, trt=None):
    """The runtime half of a fake tensorrt module (added to `trt` where given)."""
    trt = trt or types.SimpleNamespace(__version__=version)
    trt.cuda, trt.v10_0, trt.contexts = cuda, v10_0, []
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(
        STATIC="static", ON_PROFILE_CHANGE="on_profile_change", USER_MANAGED="user_managed")
    trt.nptype = lambda dtype: dtype
    if not hasattr(trt, "Logger"):
        trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            try:
                return FakeEngine(json.loads(data), trt)
            except ValueError:
                return None

    trt.Runtime = Runtime
    return trt


def _plans(tmp_path, **specs):
    paths = {}
    for name, (io, memory) in specs.items():
        paths[name] = tmp_path / f"{name}.plan"
        paths[name].write_bytes(fake_plan(io, memory))
    return paths


def _inputs(rng, batch):
    return {"sample": rng.standard_normal((batch, 1, 16, 16)).astype(np.float32),
            "timestep": np.full((batch,), 500.0, np.float32)}


def test_engines_of_one_sampler_share_one_buffer_sized_to_the_largest_fake(tmp_path):
    cuda = FakeCuda()
    trt = fake_runtime_trt(cuda)
    plans = _plans(tmp_path, unet=(UNET_IO, 3000), vae_decoder=(DECODER_IO, 7000), text_encoder=(ENCODER_IO, 500))
    engines = EngineSet(trt=trt, cuda=cuda)
    unet = engines.load(plans["unet"], TensorRTUNet)
    decoder, encoder = engines.load(plans["vae_decoder"]), engines.load(plans["text_encoder"])
    rng = np.random.default_rng(0)
    x = _inputs(rng, 4)
    np.testing.assert_array_equal(unet(x["sample"], x["timestep"]), fake_output(list(x.values()), (4, 1, 16, 16)))
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(decoder(latents), fake_output([latents], (2, 3, 16, 16)))
    ids = rng.integers(0, 500, (2, 16))
    np.testing.assert_array_equal(encoder(ids), fake_output([ids], (2, 16, 32)))
    # one buffer, at the largest need, handed to every context; no context allocates its own
    assert cuda.memory_buffers() == [((7000,), np.dtype(np.uint8))]
    assert [c.strategy for c in trt.contexts] == ["user_managed"] * 3
    assert len({c.memory for c in trt.contexts}) == 1 and trt.contexts[0].memory[1] == 7000


def test_an_engine_loaded_later_that_needs_more_gets_a_new_buffer_and_recaptures_fake(tmp_path):
    cuda = FakeCuda()
    trt = fake_runtime_trt(cuda)
    plans = _plans(tmp_path, small=(UNET_IO, 1000), large=(UNET_IO, 5000))
    engines = EngineSet(cuda_graph=True, trt=trt, cuda=cuda)
    small = engines.load(plans["small"], TensorRTUNet)
    x = _inputs(np.random.default_rng(1), 4)
    small(**x)
    small(**x)
    assert cuda.captures == 1 and cuda.replays == 1
    large = engines.load(plans["large"], TensorRTUNet)
    large(**x)
    small(**x)   # its graph baked in the old buffer's address: captured again on the new one
    assert [a[0] for a in cuda.memory_buffers()] == [(1000,), (5000,)]
    assert trt.contexts[0].memory == trt.contexts[1].memory and trt.contexts[0].memory[1] == 5000
    assert cuda.captures == 3


def test_tensorrt_10_0_contexts_get_the_buffer_through_device_memory_fake(tmp_path):
    cuda = FakeCuda()
    trt = fake_runtime_trt(cuda, version="10.0.1", v10_0=True)
    plans = _plans(tmp_path, a=(UNET_IO, 2000), b=(UNET_IO, 900))
    engines = EngineSet(trt=trt, cuda=cuda)
    a, b = engines.load(plans["a"], TensorRTUNet), engines.load(plans["b"], TensorRTUNet)
    x = _inputs(np.random.default_rng(2), 2)
    a(**x), b(**x)
    assert cuda.memory_buffers() == [((2000,), np.dtype(np.uint8))]
    assert trt.contexts[0].memory == trt.contexts[1].memory and trt.contexts[0].memory[0] is not None


def test_a_cuda_graph_is_captured_once_per_shape_and_replays_new_inputs_fake(tmp_path):
    cuda = FakeCuda()
    trt = fake_runtime_trt(cuda)
    engines = EngineSet(cuda_graph=True, trt=trt, cuda=cuda)
    unet = engines.load(_plans(tmp_path, unet=(UNET_IO, 100))["unet"], TensorRTUNet)
    rng = np.random.default_rng(3)
    for _ in range(3):   # the first call runs eagerly and captures; the next two replay
        x = _inputs(rng, 4)
        np.testing.assert_array_equal(unet(**x), fake_output(list(x.values()), (4, 1, 16, 16)))
    assert (trt.contexts[0].eager_runs, cuda.captures, cuda.replays) == (1, 1, 2)
    y = _inputs(rng, 2)   # a new shape captures anew ...
    np.testing.assert_array_equal(unet(**y), fake_output(list(y.values()), (2, 1, 16, 16)))
    x = _inputs(rng, 4)   # ... and the first shape's graph still reads and writes its own buffers
    np.testing.assert_array_equal(unet(**x), fake_output(list(x.values()), (4, 1, 16, 16)))
    assert (trt.contexts[0].eager_runs, cuda.captures, cuda.replays) == (2, 2, 3)


def test_without_cuda_graphs_every_call_runs_eagerly_fake(tmp_path):
    cuda = FakeCuda()
    trt = fake_runtime_trt(cuda)
    unet = EngineSet(trt=trt, cuda=cuda).load(_plans(tmp_path, unet=(UNET_IO, 100))["unet"], TensorRTUNet)
    rng = np.random.default_rng(4)
    for batch in (4, 4, 2, 4):
        x = _inputs(rng, batch)
        np.testing.assert_array_equal(unet(**x), fake_output(list(x.values()), (batch, 1, 16, 16)))
    assert (trt.contexts[0].eager_runs, cuda.captures) == (4, 0)
    # one set of I/O buffers per shape, reused: 2 shapes x (2 inputs + 1 output), plus the memory
    assert len(cuda.allocations) == 7


def test_a_batch_outside_the_profile_and_a_plan_that_does_not_load_are_user_errors_fake(tmp_path):
    cuda = FakeCuda()
    engines = EngineSet(trt=fake_runtime_trt(cuda), cuda=cuda)
    unet = engines.load(_plans(tmp_path, unet=(UNET_IO, 100))["unet"], TensorRTUNet)
    with pytest.raises(UserError, match=r"batch 9 is outside the engine's profile 1\.\.8"):
        unet(**_inputs(np.random.default_rng(5), 9))
    (tmp_path / "bad.plan").write_bytes(b"\x00not a plan")
    with pytest.raises(UserError, match="specific to the TensorRT version"):
        engines.load(tmp_path / "bad.plan")


def test_a_shape_outside_the_profile_in_any_dimension_is_a_user_error_fake(tmp_path):
    """TensorRT's set_input_shape answers False (rather than raising) for a resolution the
    engine was not built for: one line naming the profile, not a failure further on."""
    cuda = FakeCuda()
    unet = EngineSet(trt=fake_runtime_trt(cuda), cuda=cuda).load(_plans(tmp_path, unet=(UNET_IO, 100))["unet"],
                                                                  TensorRTUNet)
    x = _inputs(np.random.default_rng(6), 2)
    with pytest.raises(UserError, match=r"input sample of shape \[2, 1, 32, 32\] is outside the engine's profile"):
        unet(np.zeros((2, 1, 32, 32), np.float32), x["timestep"])


def test_a_failed_cuda_graph_capture_falls_back_to_eager_runs_fake(tmp_path, capsys):
    cuda = FakeCuda()
    cuda.fail_capture = True
    trt = fake_runtime_trt(cuda)
    unet = EngineSet(cuda_graph=True, trt=trt, cuda=cuda).load(_plans(tmp_path, unet=(UNET_IO, 100))["unet"],
                                                               TensorRTUNet)
    rng = np.random.default_rng(7)
    for _ in range(3):
        x = _inputs(rng, 4)
        np.testing.assert_array_equal(unet(**x), fake_output(list(x.values()), (4, 1, 16, 16)))
    assert (trt.contexts[0].eager_runs, cuda.replays) == (3, 0)
    assert capsys.readouterr().err.count("CUDA graph capture failed") == 1
