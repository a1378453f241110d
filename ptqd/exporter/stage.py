"""The export stage: OUT/calibration + the model -> OUT/onnx (FP and QDQ graphs, precision
plan) and OUT/scheduler (the folded PTQD schedule)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import onnx

from ptqd.calibration.artifact import load_ptqd_json, steps_and_corrections
from ptqd.calibration.params import load_params
from ptqd.errors import UserError
from ptqd.exporter.graph_files import graph_path
from ptqd.exporter.lint import lint_model
from ptqd.exporter.onnx_fp import export_fp_onnx, layer_nodes
from ptqd.exporter.precision_plan import precision_plan
from ptqd.exporter.qdq import ONNXRUNTIME, ONNXRUNTIME_FAST, TENSORRT, insert_qdq
from ptqd.exporter.timeline import build_schedule

# flavour -> (storage, whose lint rules apply); file names in graph_files.GRAPH_FILES
FLAVOURS = {
    "tensorrt": (TENSORRT, "tensorrt"),
    "onnxruntime": (ONNXRUNTIME, "onnxruntime"),
    "cpu-fast": (ONNXRUNTIME_FAST, "onnxruntime"),
}
PLAN_FILE = "precision_plan.json"


def _save_checked(model: onnx.ModelProto, path: Path, target: str) -> None:
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    violations = lint_model(model, target)
    if violations:  # the exporter's own output breaking the rules is a bug, not a user error
        raise RuntimeError(f"{path.name} fails the {target} lint: " + "; ".join(map(str, violations[:3])))


def export_graphs(model, calibration_dir: Path, onnx_dir: Path) -> list[Path]:
    doc = load_ptqd_json(calibration_dir)
    if doc["model_sha256"] != model.source.sha256:
        raise UserError(f"{calibration_dir} was calibrated for another model (sha256 differs); "
                        "recalibrate or pass the model it was made from")
    params = load_params(calibration_dir)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fp_path = export_fp_onnx(model.unet, graph_path(onnx_dir, "fp32", "tensorrt"))
    fp_model = onnx.load(str(fp_path))
    written = [fp_path]
    for cfg in sorted(params):
        for flavour, (storage, target) in FLAVOURS.items():
            path = graph_path(onnx_dir, cfg, flavour)
            _save_checked(insert_qdq(fp_model, params[cfg], storage), path, target)
            written.append(path)
    plan = precision_plan(layer_nodes(fp_model), params, fp_model)
    (onnx_dir / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")
    for path in written:
        click.echo(f"[export] {onnx_dir.name}/{path.name} ({path.stat().st_size / 1e6:.2f} MB)")
    click.echo(f"[export] {len(written)} graphs checked and linted in {time.perf_counter() - t0:.1f} s")
    return written


def export_scheduler(model, calibration_dir: Path, scheduler_dir: Path) -> Path:
    from ptqd.exporter.diffusers_scheduler import PTQDFoldedScheduler

    doc = load_ptqd_json(calibration_dir)
    configs, corrections = steps_and_corrections(doc, "mixed", correction=True)
    size = model.unet.config.sample_size
    schedule = build_schedule(model.scheduler_config, doc["num_inference_steps"], doc["eta"],
                              [model.unet.config.in_channels, size, size], configs, corrections)
    path = schedule.save(scheduler_dir)
    PTQDFoldedScheduler.from_schedule(schedule).save_pretrained(str(scheduler_dir))
    runs = ", ".join(f"{c}×{configs.count(c)}" for c in sorted(set(configs)))
    click.echo(f"[export] {scheduler_dir.name}/{path.name}: {len(configs)} steps ({runs})")
    return path
