"""Estimated UNet step latency per configuration on a target GPU: a roofline per layer.

TensorRT runs a convolution in FP16, INT8 or FP8 only; 4-bit exists only for MatMul/Gemm, as
INT4 weight-only with blocked scales and as NVFP4 on Blackwell (TRT_API.md §3, BACKENDS.md,
GROWTH.md). So what a configuration changes on a GPU is the kernel each layer runs on, not its
bit widths: w4a8 and w8a8 convolutions run the same INT8 kernels, and the BOPs metric
(mixed_precision.py) prices trades the GPU never pays out.

Per Conv2d/Linear layer, on its kernel (runtime.formats.KERNELS), at batch B:

    time = max(2 * MACs * B / tensor-core peak of the kernel's rate,  bytes / memory bandwidth)
    bytes = weights x the kernel's bytes per weight (2 FP16, 1 INT8/FP8 also when the values
            are 4-bit, 0.5 + block scales for INT4 weight-only and NVFP4)
          + B * input elements x its bytes per input (2 FP16, 1 INT8/FP8, 0.5 + scales NVFP4)
          + B * output elements (2 bytes, FP16)

INT4 weight-only layers compute at the FP16 rate: they save weight traffic, not arithmetic.

The rest of the step runs in FP16 whatever the configuration: every op outside Conv2d/Linear
(GroupNorm, SiLU, residual adds, concatenations, upsampling) as FP16 memory traffic, and each
attention core (Q K^T, softmax, P V) as a roofline of its FP16 MACs against reading Q, K, V and
writing its output, the scores staying on chip as in TensorRT's fused attention kernels.

Approximations (all figures this module returns are estimates, and labelled so by callers):
- Peaks are the datasheets' dense figures (gpus.GPUS, ⚠ secondary sources); real kernels reach
  a fraction of them, so compute-bound layers come out optimistic.
- No kernel launch overhead, no overlap between layers, no cache reuse between layers; small
  models at batch 1 are launch-bound on a real GPU, so their real speed-ups are smaller.
- Every float op is its own kernel, except arithmetic with a constant (x / 1.0), taken as fused
  into its producer. TensorRT fuses more (pointwise chains, GroupNorm + SiLU, concatenations
  written in place), so the float traffic is an upper bound, which shrinks every configuration's
  speed-up over FP16 rather than inflating it.
- Attention is assumed fused (the scores never reach memory); the attention module's residual
  add is counted as traffic. Biases and the quantize ops feeding a layer are not counted.
"""
from __future__ import annotations

from ptqd.calibration.configs import BitConfig
from ptqd.calibration.gpus import DEFAULT_GPU, GPU, format_peak, gpu_spec
from ptqd.calibration.layers import FloatOps, LayerInfo
from ptqd.errors import UserError
from ptqd.runtime.formats import FLOAT_KERNEL, KERNELS, config_kernel

# the all-FP16 engine's configuration, always estimated: the speed every other is measured against
FP16_ENGINE = "fp16"
OUTPUT_BYTES = 2         # layer outputs are FP16: Q/DQ sit on layer inputs only


def layer_kernel(config: str, layer: LayerInfo, keep: tuple[str, ...]) -> str:
    """The TensorRT kernel a layer runs in a configuration (runtime.formats.config_kernel); FP16
    where it stays float: kept, or no whole number of its format's blocks wide."""
    return FLOAT_KERNEL if BitConfig.parse(config).stays_float(layer, keep) else config_kernel(config, layer.kind)


def tensor_rate(gpu: GPU, rate: str) -> float:
    """Dense tensor-core operations per second (one MAC = 2 operations)."""
    return format_peak(gpu, rate) * 1e12


def layer_seconds(layer: LayerInfo, kernel: str, batch: int, gpu: GPU) -> float:
    """Roofline time of one Conv2d/Linear layer running on `kernel` (runtime.formats.KERNELS)."""
    k = KERNELS[kernel]
    compute = 2 * layer.macs * batch / tensor_rate(gpu, k.rate)
    moved = layer.params * k.weight_bytes + batch * (layer.in_elems * k.act_bytes + layer.out_elems * OUTPUT_BYTES)
    return max(compute, moved / (gpu.bandwidth_tbs * 1e12))


def float_seconds(ops: FloatOps, batch: int, gpu: GPU) -> float:
    """Everything outside Conv2d/Linear, in FP16, the same for every configuration."""
    bandwidth = gpu.bandwidth_tbs * 1e12
    fp16 = KERNELS[FLOAT_KERNEL]
    traffic = ops.elems * batch * fp16.act_bytes / bandwidth
    rate = tensor_rate(gpu, fp16.rate)
    cores = sum(max(2 * c.macs * batch / rate, c.elems * batch * fp16.act_bytes / bandwidth)
                for c in ops.attention)
    return traffic + cores


def _check(layers: list[LayerInfo], batch: int) -> None:
    if batch < 1:
        raise UserError(f"batch {batch}: the latency estimate needs a batch of at least 1")
    unmeasured = [layer.name for layer in layers if layer.params == 0]
    if unmeasured:
        raise ValueError(f"layers without measured sizes (use measure_layers): {unmeasured[:3]}")


def estimate_step_latency(layers: list[LayerInfo], float_ops: FloatOps, configs, keep: tuple[str, ...],
                          batch: int = 1, gpu: str = DEFAULT_GPU) -> dict[str, float]:
    """Estimated milliseconds of one UNet step (one call at `batch`) per configuration, always
    including "fp16", the all-FP16 engine. Raises UserError for an unknown GPU or configuration
    and for a format the GPU has no tensor cores for (FP8 on the A100, FP4 before Blackwell)."""
    target = gpu_spec(gpu)
    _check(layers, batch)
    rest = float_seconds(float_ops, batch, target)
    out = {}
    for config in dict.fromkeys([FP16_ENGINE, *configs]):
        seconds = sum(layer_seconds(layer, layer_kernel(config, layer, keep), batch, target)
                      for layer in layers)
        out[config] = (seconds + rest) * 1e3
    return out


def float_ops_ms(float_ops: FloatOps, batch: int = 1, gpu: str = DEFAULT_GPU) -> float:
    """The part of every configuration's estimate spent outside Conv2d/Linear, in ms."""
    return float_seconds(float_ops, batch, gpu_spec(gpu)) * 1e3


def same_cost(latencies: dict[str, float], rel: float = 0.01) -> list[list[str]]:
    """Groups of two or more configurations whose estimates lie within `rel` of the group's
    fastest, fastest group first: configurations that cost the same on the target."""
    groups: list[list[str]] = []
    anchor = None
    for name, value in sorted(latencies.items(), key=lambda kv: (kv[1], kv[0])):
        if anchor is not None and value <= anchor * (1 + rel):
            groups[-1].append(name)
        else:
            groups.append([name])
            anchor = value
    return [g for g in groups if len(g) > 1]
