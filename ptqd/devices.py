"""Which torch device calibration and torch sampling run on (`--device`).

Only the torch parts move: the full-precision trajectories, activation observation, scale
searches, GPTQ, PTQD statistics and fake-quant sampling. Recorded trajectories and the
statistics' arithmetic stay in float32 on the CPU side of the numpy interface, so a run on
`cpu` gives what ptqd gave before the option existed.
"""
from __future__ import annotations

import numpy as np
import torch

from ptqd.errors import UserError

DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str):
    """`spec` as a torch.device; a CUDA device torch cannot use is a UserError."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    kind, _, index = spec.partition(":")
    if kind != "cuda" or (":" in spec and not index.isdigit()):
        raise UserError(f"--device {spec!r}: expected {DEVICES}")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(f"--device {spec}: torch sees no CUDA GPU here (torch {torch.__version__}, {build}); "
                        "use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(spec)


def module_device(module):
    """The device a module's parameters live on (CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def to_device(a: np.ndarray, device) -> torch.Tensor:
    """A numpy array as a torch tensor on `device` (the numpy side of every torch engine)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)
