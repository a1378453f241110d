"""Target GPUs for the latency estimates: published dense peaks per format and memory
bandwidth. Kept apart from the latency model (which measures a torch UNet) so the CLI can list
the targets without importing torch."""
from __future__ import annotations

from dataclasses import dataclass

from ptqd.errors import UserError


@dataclass(frozen=True)
class GPU:
    name: str
    label: str
    fp16_tflops: float          # dense FP16 tensor core
    fp8_tflops: float | None    # dense FP8 (E4M3) tensor core; None: the GPU has none
    int8_tops: float            # dense INT8 tensor core
    bandwidth_tbs: float        # memory bandwidth, TB/s
    fp4_tflops: float | None = None   # dense FP4 (NVFP4) tensor core; None: before Blackwell


# Dense peaks = the datasheets' "with sparsity" figures / 2. All from TRT_API.md addendum §7,
# which read them only through secondary copies of NVIDIA's datasheets (⚠).
GPUS = {
    # H100 SXM datasheet copy (archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html): FP16
    # 1,979*, FP8 3,958*, INT8 3,958* ("* Shown with sparsity"), 3,350 GB/s HBM3.
    "h100": GPU("h100", "H100 SXM", 989.5, 1979.0, 1979.0, 3.35),
    # H200 SXM: the H100's compute with HBM3e at 4.8 TB/s (lzwjava, aiwiki pages).
    "h200": GPU("h200", "H200 SXM", 989.5, 1979.0, 1979.0, 4.8),
    # A100 SXM 80GB (glennklockwood.com, citing NVIDIA's datasheet: sparse 624 FP16 / 1,248
    # INT8), 2,039 GB/s. Ampere has no FP8 tensor cores.
    "a100": GPU("a100", "A100 SXM 80GB", 312.0, None, 624.0, 2.039),
    # L40S datasheet copy (mullet.se): FP16 733*, FP8 1,466*; INT8 732.9 dense (hmc-tech);
    # 864 GB/s GDDR6.
    "l40s": GPU("l40s", "L40S", 362.0, 733.0, 733.0, 0.864),
    # B200 (HGX, 1,000 W; glennklockwood.com/garden/processors/B200, citing NVIDIA's Blackwell
    # figures): dense FP16 2,250, FP8 4,500, INT8 4,500, FP4 9,000 (sparse twice each); 8 TB/s
    # HBM3e (hmc-tech lists 7.7 TB/s).
    "b200": GPU("b200", "B200 (HGX)", 2250.0, 4500.0, 4500.0, 8.0, fp4_tflops=9000.0),
    # RTX 5090 (Blackwell GB202; NVIDIA's RTX Blackwell GPU architecture whitepaper figures as
    # copied by secondary sources, ⚠): tensor peaks with sparsity and FP16 accumulate FP16 838.4,
    # FP8 1,676.8, FP4 3,352 -> dense halves; INT8 taken equal to FP8 (not confirmed); 1,792 GB/s
    # GDDR7. The FP32-accumulate rates TensorRT's FP16 kernels may use are not confirmed either.
    "rtx5090": GPU("rtx5090", "RTX 5090", 419.2, 838.4, 838.4, 1.792, fp4_tflops=1676.0),
    # RTX 4090 (waredb): FP16 and FP8 at FP32 accumulate, the rates TensorRT's FP32-accumulating
    # kernels see; the FP16-accumulate rates (x2) are not confirmed. 1,008 GB/s GDDR6X.
    "rtx4090": GPU("rtx4090", "RTX 4090", 165.2, 330.3, 660.6, 1.008),
}
DEFAULT_GPU = "h100"


def gpu_spec(name: str) -> GPU:
    gpu = GPUS.get(name.strip().lower())
    if gpu is None:
        raise UserError(f"unknown target GPU {name!r} (known: {', '.join(GPUS)})")
    return gpu


def format_peak(gpu: GPU, rate: str) -> float:
    """Dense tensor-core peak (TFLOPS / TOPS) at `rate` (fp16, int8, fp8, fp4: a
    runtime.formats.Kernel's) on `gpu`; UserError where it has none (A100: no FP8; FP4 only
    from Blackwell)."""
    peak = {"fp16": gpu.fp16_tflops, "fp8": gpu.fp8_tflops, "int8": gpu.int8_tops, "fp4": gpu.fp4_tflops}[rate]
    if peak is None:
        raise UserError(f"the {gpu.label} ({gpu.name}) has no {rate.upper()} tensor cores: "
                        f"leave the {rate} configurations out or pick another --target-gpu"
                        + (" (FP4 needs a Blackwell GPU: b200, rtx5090)" if rate == "fp4" else ""))
    return peak
