"""ONNX Runtime as a denoiser engine: the CPU backend and the reference for every other one."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def session_options(threads: int | None = None, float_kernels: bool = False):
    """float_kernels: run a QDQ graph as written (dequantize, float op), the exact twin of the
    fake-quant model. Otherwise onnxruntime fuses DQ -> Conv/MatMul -> Q into integer kernels,
    whose u8 x s8 products on x86 CPUs without VNNI (AVX2 only) sum pairwise in saturating int16:
    with full-range 8-bit weights that changes results (measured on an AVX2 EPYC: a w8a8 UNet
    2.3x further from its fake-quant twin than with float kernels; 4-bit weights cannot overflow)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if float_kernels
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    # One intra-op pool sized to the cores; inter-op parallelism buys nothing for a UNet's
    # mostly sequential graph and only adds thread contention.
    opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return opts


# onnxruntime 1.32's QDQ propagation moves INT8 Q/DQ pairs across Reshape/Unsqueeze and
# builds a QuantizeLinear whose output type (INT8) disagrees with its zero point (UINT8), so
# the session fails to load graphs with quantized layer outputs. The pass only moves Q/DQ
# around shape ops; the QLinearConv/QLinearMatMul/QGemm fusions do not depend on it.
DISABLED_OPTIMIZERS = ["QDQPropagationTransformer"]


def create_session(path: Path, threads: int | None = None, providers: list[str] | None = None,
                   optimized_path: Path | None = None, float_kernels: bool = False):
    import onnxruntime as ort

    from ptqd.errors import UserError

    opts = session_options(threads, float_kernels)
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), opts, providers=providers or available_providers(),
                                    disabled_optimizers=DISABLED_OPTIMIZERS)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} does not load in onnxruntime ({first}); was it truncated or "
                        "edited? `ptqd verify` checks the output against its manifest") from None


def available_providers() -> list[str]:
    import onnxruntime as ort

    preferred = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    have = ort.get_available_providers()
    return [p for p in preferred if p in have]


# onnxruntime's element type names -> numpy dtypes, for the inputs ptqd's graphs take
_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OnnxRuntimeGraph:
    """Callable over one onnxruntime session: keyword arrays (cast to the graph's input
    types) -> the first output (`run`) or every output by name (`outputs`: an SDXL text
    encoder's hidden states and pooled embedding). The VAE decoder and text encoders run
    through this. float_kernels: see session_options (the reference graphs, compared with
    fake-quant)."""

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None,
                 float_kernels: bool = False):
        self.path = Path(path)
        self.session = create_session(self.path, threads, providers, float_kernels=float_kernels)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_name = self.output_names[0]
        self.input_types = {i.name: _DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}

    @property
    def input_names(self) -> list[str]:
        return list(self.input_types)

    def _feeds(self, inputs: dict) -> dict:
        return {name: np.ascontiguousarray(inputs[name], dtype=dtype) for name, dtype in self.input_types.items()}

    def run(self, **inputs: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], self._feeds(inputs))[0]

    def outputs(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, self._feeds(inputs))))

    def __call__(self, *args: np.ndarray) -> np.ndarray:
        """Positional inputs in the graph's order (text encoder: input_ids; decoder: latents)."""
        return self.run(**dict(zip(self.input_types, args)))


class OnnxRuntimeUNet(OnnxRuntimeGraph):
    """A denoiser (UNet or transformer) as an engine: (sample, timestep, **conditioning) -> eps."""

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditioning: np.ndarray) -> np.ndarray:
        return self.run(sample=sample, timestep=timestep, **conditioning)
