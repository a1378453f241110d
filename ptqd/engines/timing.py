"""Measured engine latencies: OUT/engines/<plan stem>.timing.json, one per plan.

Written by engines/build_engines.sh (trtexec's "GPU Compute Time" median) or by the Python
builder (CUDA-event timing through the TensorRT Python API), both at the profile's opt batch.
Readers take `config`, `median_ms` and `batch`; the denoiser's files (unet_<cfg>.timing.json,
transformer_<cfg>.timing.json) replace estimated step latencies with measured ones.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ptqd.runtime.layout import DEFAULT_DENOISER, TIMING_FILE, denoiser_model_name

FORMAT_VERSION = 1


def timing_path(engines_dir: Path, name: str) -> Path:
    """name: the plan's stem (unet_w4a8, vae_decoder, text_encoder)."""
    return Path(engines_dir) / TIMING_FILE.format(name=name)


def timing_record(name: str, config: str, median_ms: float, batch: int, measured_by: str,
                  tensorrt_version: str, gpu: str, cuda_graph: bool) -> dict:
    return {"format_version": FORMAT_VERSION, "engine": f"{name}.plan", "config": config,
            "median_ms": float(median_ms), "batch": int(batch), "measured_by": measured_by,
            "tensorrt_version": tensorrt_version, "gpu": gpu, "cuda_graph": cuda_graph}


def write_timing(engines_dir: Path, name: str, record: dict) -> Path:
    path = timing_path(engines_dir, name)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def _valid(record, stem: str, denoiser: str) -> bool:
    if not isinstance(record, dict):
        return False
    median, batch, config = record.get("median_ms"), record.get("batch"), record.get("config")
    return (isinstance(median, (int, float)) and not isinstance(median, bool) and math.isfinite(median)
            and median > 0 and isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1
            and isinstance(config, str) and stem == denoiser_model_name(denoiser, config))


def measured_latencies(engines_dir: Path, denoiser: str = DEFAULT_DENOISER) -> dict[str, dict]:
    """Denoiser configuration -> its timing record, for every readable <denoiser>_<cfg>.timing.json.

    A file that does not parse, lacks a positive median_ms or a batch, or names another
    configuration than its file name is skipped: a measurement is an optional refinement,
    so a damaged one falls back to the estimate instead of stopping the caller."""
    found: dict[str, dict] = {}
    pattern = TIMING_FILE.format(name=denoiser_model_name(denoiser, "*"))
    suffix = TIMING_FILE.format(name="")
    for path in sorted(Path(engines_dir).glob(pattern)):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _valid(record, path.name[: -len(suffix)], denoiser):
            found[record["config"]] = record
    return found
