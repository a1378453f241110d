"""`calibration/ptqd.json`: the PTQD constants and the precision schedule, with the
(model, step count, eta, configurations) tuple they are valid for (ARCHITECTURE.md)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ptqd.calibration.configs import FLOAT_CONFIG
from ptqd.errors import UserError

PTQD_JSON = "ptqd.json"
FORMAT_VERSION = 1


def write_ptqd_json(folder: Path, doc: dict) -> Path:
    path = folder / PTQD_JSON
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, **doc}, indent=1) + "\n")
    return path


def _finite(value, where: str) -> None:
    if isinstance(value, (list, tuple)):
        for v in value:
            _finite(v, where)
    elif isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where} holds a non-finite value ({value}); recalibrate")


def load_ptqd_json(folder: Path) -> dict:
    path = folder / PTQD_JSON
    if not path.is_file():
        raise UserError(f"{folder} has no {PTQD_JSON}: run `ptqd calibrate` (or export-trt) first")
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); it was truncated or edited") from None
    if doc.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: unknown format version {doc.get('format_version')!r}")
    tables = [("schedule", doc.get("steps", []))] + list(doc.get("stats", {}).items())
    for name, per_step in tables:
        for s in per_step:
            for key in ("k", "bias", "sigma_q", "bias_map"):
                _finite(s.get(key), f"{path} ({name}, step {s.get('index')}, {key})")
    return doc


def steps_and_corrections(doc: dict, precision: str, correction: bool) -> tuple[list[str], list[dict] | None]:
    """Per step: which configuration runs it, and the PTQD correction it gets (or None)."""
    steps = doc["num_inference_steps"]
    if precision == "mixed":
        configs = [s["config"] for s in doc["steps"]]
    elif precision == FLOAT_CONFIG:
        return [FLOAT_CONFIG] * steps, None
    elif precision in doc["configs"]:
        configs = [precision] * steps
    else:
        have = ", ".join(["mixed", FLOAT_CONFIG, *sorted(doc["configs"])])
        raise UserError(f"--precision {precision!r} is not in this output (it has: {have})")
    if not correction:
        return configs, None
    corrections = []
    for i, cfg in enumerate(configs):
        s = doc["stats"][cfg][i]
        bias = s["bias_map"] if s.get("bias_map") is not None else s["bias"]
        corrections.append({"k": s["k"], "bias": bias, "sigma_q": s["sigma_q"]})
    return configs, corrections
