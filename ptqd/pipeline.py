"""The stages as functions over an output root, and `export-trt` running them in order.

Every run writes into a temporary sibling and renames on success (ptqd.output), so an
interrupted run never leaves a half-written stage behind.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from ptqd.calibration.stage import CalibrationRequest
from ptqd.errors import UserError
from ptqd.output import MANIFEST, check_output_dir, staged_directory, write_manifest

CALIBRATION_DIR = "calibration"
ONNX_DIR = "onnx"
SCHEDULER_DIR = "scheduler"
ENGINES_DIR = "engines"
TRITON_DIR = "triton"


@dataclass(frozen=True)
class ExportRequest:
    calibration: CalibrationRequest
    out: Path
    force: bool = False
    backend: str = "auto"
    batch: str = "1,4,8"


def engine_settings(backend: str, batch: str):
    """Checked before any work starts: a bad --batch, or --backend tensorrt where TensorRT is
    missing, fails in one line with nothing written."""
    from ptqd.engines.profiles import BatchProfile
    from ptqd.engines.stage import BACKENDS
    from ptqd.engines.tensorrt import BuildSettings, import_tensorrt

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    settings = BuildSettings(BatchProfile.parse(batch))
    if backend == "tensorrt":
        import_tensorrt()
    return settings


@dataclass
class LoadedModel:
    source: object
    unet: object
    scheduler_config: dict


def load_model(spec: str, steps: int) -> LoadedModel:
    """Resolve, check and load --model; `steps` is checked against its training timesteps."""
    from ptqd.model import load_scheduler_config, load_unet, resolve_model

    source = resolve_model(spec)
    sched_cfg = load_scheduler_config(source)
    train_steps = int(sched_cfg.get("num_train_timesteps", 1000))
    if steps > train_steps:
        raise UserError(f"--steps {steps} exceeds the model's {train_steps} training timesteps")
    return LoadedModel(source, load_unet(source), sched_cfg)


def stage_calibrate(folder: Path, req: CalibrationRequest, model: LoadedModel) -> dict:
    from ptqd.calibration.stage import run_calibration

    return run_calibration(req, model.source, model.unet, model.scheduler_config, folder)


def stage_export(calibration_dir: Path, root: Path, model: LoadedModel) -> None:
    """root/onnx and root/scheduler from a calibration folder."""
    from ptqd.exporter.stage import export_graphs, export_scheduler

    export_graphs(model, calibration_dir, root / ONNX_DIR)
    export_scheduler(model, calibration_dir, root / SCHEDULER_DIR)


def stage_engines(root: Path, backend: str, settings, engines_dir: Path | None = None) -> str:
    from ptqd.engines.stage import build_engines

    return build_engines(root, engines_dir or root / ENGINES_DIR, backend, settings)


def stage_deploy(root: Path, unets: str = "auto", instances: int | None = None,
                 dest: Path | None = None) -> str:
    from ptqd.deploy.repository import DEFAULT_INSTANCES, write_repository

    return write_repository(root, dest or root / TRITON_DIR, unets, instances or DEFAULT_INSTANCES)


def _config_dict(req: CalibrationRequest) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(req).items()}


def update_manifest(root: Path, stages: list[str], config: dict, model_sha256: str) -> None:
    previous = {}
    if (root / MANIFEST).is_file():
        try:
            previous = json.loads((root / MANIFEST).read_text())
        except ValueError:
            previous = {}
    done = [s for s in previous.get("stages", []) if s not in stages] + stages
    write_manifest(root, {**previous.get("config", {}), **config}, model_sha256, done)


def run_export(req: ExportRequest) -> Path:
    req.calibration.validate()
    settings = engine_settings(req.backend, req.batch)
    check_output_dir(req.out, req.force)
    model = load_model(req.calibration.model, req.calibration.steps)
    click.echo(f"model {model.source.spec} (sha256 {model.source.sha256[:12]})")
    with staged_directory(req.out) as root:
        stage_calibrate(root / CALIBRATION_DIR, req.calibration, model)
        stage_export(root / CALIBRATION_DIR, root, model)
        built = stage_engines(root, req.backend, settings)
        stage_deploy(root)
        update_manifest(root, ["calibrate", "export", f"engines-{built}", "deploy"],
                        {**_config_dict(req.calibration), "backend": req.backend, "batch": req.batch},
                        model.source.sha256)
    click.echo("not run (not implemented yet): report")
    click.echo(f"wrote {req.out}")
    return req.out


def run_calibrate(req: CalibrationRequest, out: Path, force: bool) -> Path:
    """`ptqd calibrate`: OUT/calibration alone, replacing an old one only with --force."""
    req.validate()
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; give a directory path")
    target = out / CALIBRATION_DIR
    if target.exists() and not force:
        raise UserError(f"{target} exists; pass --force to recalibrate")
    if not out.absolute().parent.exists():
        raise UserError(f"cannot create output {out}: {out.absolute().parent} does not exist")
    model = load_model(req.model, req.steps)
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        with staged_directory(target) as staging:
            stage_calibrate(staging, req, model)
        update_manifest(out, ["calibrate"], _config_dict(req), model.source.sha256)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    click.echo(f"wrote {target}")
    return target


def run_export_stage(out: Path, force: bool) -> None:
    """`ptqd export OUT`: onnx/ and scheduler/ from OUT/calibration, swapped in together."""
    import tempfile

    from ptqd.calibration.artifact import load_ptqd_json
    from ptqd.output import replace_directory

    if not out.is_dir():
        raise UserError(f"{out} is not an output directory (run `ptqd calibrate --output {out}` first)")
    doc = load_ptqd_json(out / CALIBRATION_DIR)
    for name in (ONNX_DIR, SCHEDULER_DIR):
        if (out / name).exists() and not force:
            raise UserError(f"{out / name} exists; pass --force to export again")
    model = load_model(doc["model"], doc["num_inference_steps"])
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        staging = Path(tmp)
        stage_export(out / CALIBRATION_DIR, staging, model)
        for name in (ONNX_DIR, SCHEDULER_DIR):
            replace_directory(staging / name, out / name)
    update_manifest(out, ["export"], {}, model.source.sha256)
    click.echo(f"wrote {out / ONNX_DIR} and {out / SCHEDULER_DIR}")


def run_build_stage(out: Path, backend: str, batch: str, force: bool) -> None:
    """`ptqd build OUT`: OUT/engines from OUT/onnx and OUT/scheduler."""
    settings = engine_settings(backend, batch)
    if not out.is_dir():
        raise UserError(f"{out} is not an output directory (made by export-trt or ptqd export)")
    if (out / ENGINES_DIR).exists() and not force:
        raise UserError(f"{out / ENGINES_DIR} exists; pass --force to rebuild")
    with staged_directory(out / ENGINES_DIR) as staging:
        built = stage_engines(out, backend, settings, engines_dir=staging)
    sha = json.loads((out / MANIFEST).read_text()).get("model_sha256", "") if (out / MANIFEST).is_file() else ""
    update_manifest(out, [f"engines-{built}"], {"backend": backend, "batch": batch}, sha)
    click.echo(f"wrote {out / ENGINES_DIR}")


def run_deploy_stage(out: Path, unets: str, instances: int, force: bool) -> None:
    """`ptqd deploy OUT`: OUT/triton from OUT/scheduler, OUT/engines and OUT/onnx."""
    if not out.is_dir():
        raise UserError(f"{out} is not an output directory (made by export-trt)")
    if (out / TRITON_DIR).exists() and not force:
        raise UserError(f"{out / TRITON_DIR} exists; pass --force to write it again")
    with staged_directory(out / TRITON_DIR) as staging:
        stage_deploy(out, unets, instances, dest=staging)
    sha = json.loads((out / MANIFEST).read_text()).get("model_sha256", "") if (out / MANIFEST).is_file() else ""
    update_manifest(out, ["deploy"], {"unets": unets, "instances": instances}, sha)
    click.echo(f"wrote {out / TRITON_DIR}")
