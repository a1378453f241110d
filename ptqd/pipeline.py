"""The stages as functions over an output root, and `export-trt` running them in order.

Every run writes into a temporary sibling and renames on success (ptqd.output), so an
interrupted run never leaves a half-written stage behind.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click

from ptqd.calibration.configs import DEFAULT_CALIB_BATCH
from ptqd.calibration.request import CalibrationRequest
from ptqd.errors import UserError
from ptqd.model import LoadedModel, load_model
from ptqd.output import MANIFEST, check_output_dir, read_manifest, staged_directory, write_manifest
from ptqd.runtime.layout import (CALIBRATION_DIR, ENGINES_DIR, KUBERNETES_DIR, ONNX_DIR, REPORT_DIR, SCHEDULER_DIR,
                                 TRITON_DIR)



@dataclass(frozen=True)
class ExportRequest:
    calibration: CalibrationRequest
    out: Path
    force: bool = False
    backend: str = "auto"
    batch: str = "1,4,8"
    report: bool = True
    report_samples: int = 128
    device: str = "auto"   # where torch runs (devices.resolve_device); not part of any digest


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


def stage_calibrate(folder: Path, req: CalibrationRequest, model: LoadedModel) -> dict:
    from ptqd.calibration.stage import run_calibration

    return run_calibration(req, model, folder)


def stage_export(calibration_dir: Path, root: Path, model: LoadedModel) -> None:
    """root/onnx and root/scheduler from a calibration folder."""
    from ptqd.exporter.stage import export_graphs, export_scheduler

    # graphs are traced on the CPU, whatever --device calibrated: the ONNX files are the same
    model.to("cpu")
    export_scheduler(model, calibration_dir, root / SCHEDULER_DIR)
    export_graphs(model, calibration_dir, root / ONNX_DIR)   # releases the torch modules


def stage_engines(root: Path, backend: str, settings, engines_dir: Path | None = None) -> str:
    from ptqd.engines.stage import build_engines

    return build_engines(root, engines_dir or root / ENGINES_DIR, backend, settings)


def stage_deploy(root: Path, unets: str = "auto", instances: int | None = None,
                 dest: Path | None = None) -> str:
    from ptqd.deploy.repository import DEFAULT_INSTANCES, write_repository

    return write_repository(root, dest or root / TRITON_DIR, unets, instances or DEFAULT_INSTANCES)


def stage_report(root: Path, samples: int, dest: Path | None = None) -> None:
    from ptqd.evaluation.report import write_report

    write_report(root, dest or root / REPORT_DIR, samples)
    click.echo(f"[report] {REPORT_DIR}/report.html, metrics.json and plots ({samples} samples per variant)")


def _config_dict(req: CalibrationRequest) -> dict:
    """The request as recorded (manifest, resume digest): the weight rounding resolved, so that
    the default and its explicit value are one calibration."""
    doc = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(req).items()}
    return {**doc, "weight_rounding": req.rounding}


def update_manifest(root: Path, stages: list[str], config: dict, model_sha256: str | None = None,
                    stage_records: dict | None = None) -> None:
    """Merge into root's manifest; model_sha256 None keeps the recorded one. A stage run alone
    (stage_records None) keeps export-trt's resume records: each also holds its stage's
    output digest, so a stage whose files the lone run changed, and every stage after it,
    no longer matches and is redone."""
    previous = read_manifest(root)
    done = [s for s in previous.get("stages", []) if s not in stages] + stages
    records = stage_records if stage_records is not None else previous.get("stage_records", {})
    sha = model_sha256 if model_sha256 is not None else previous.get("model_sha256", "")
    write_manifest(root, {**previous.get("config", {}), **config}, sha, done, stage_records=records)


PIPELINE = ("calibrate", "export", "engines", "deploy", "report")


def pipeline_stages(req: ExportRequest) -> tuple[str, ...]:
    return PIPELINE if req.report else PIPELINE[:-1]


def stage_inputs(stage: str, root: Path, req: ExportRequest, model_sha256: str) -> str:
    """What a stage's result depends on: its options and the files of the stages before it."""
    from ptqd import __version__
    from ptqd.engines.tensorrt import gpu_description, tensorrt_version
    from ptqd.resume import inputs_digest, tree_digest

    parts: dict = {"stage": stage, "ptqd": __version__}
    if stage == "calibrate":
        # conditioning options at their defaults are left out: outputs made before they existed
        # (unconditional models) keep their digest
        request = {k: v for k, v in _config_dict(req.calibration).items()
                   if not (k in ("guidance_scale", "conditions") and v in (None, []))
                   and not (k == "format" and v == "int") and not (k == "sensitivity" and v)
                   and not (k == "calib_batch" and v == DEFAULT_CALIB_BATCH)}
        parts.update(model=model_sha256, request=request)
    elif stage == "export":
        parts.update(calibration=tree_digest(root, (CALIBRATION_DIR,)))
    elif stage == "engines":
        trt = tensorrt_version()
        parts.update(graphs=tree_digest(root, (ONNX_DIR, SCHEDULER_DIR)), backend=req.backend,
                     batch=req.batch, tensorrt=trt, gpu=gpu_description() if trt else None)
    elif stage == "deploy":
        # the repository records onnxruntime threads per instance, from this machine's cores
        parts.update(upstream=tree_digest(root, (ONNX_DIR, SCHEDULER_DIR, ENGINES_DIR)),
                     cores=len(os.sched_getaffinity(0)))
    else:
        parts.update(upstream=tree_digest(root, (CALIBRATION_DIR, ONNX_DIR, SCHEDULER_DIR, ENGINES_DIR,
                                                 TRITON_DIR)), samples=req.report_samples)
    return inputs_digest(parts)


def stages_to_redo(req: ExportRequest, model_sha256: str, ledger) -> list[str]:
    """Against the previous output: the first stage whose inputs or outputs changed, and
    everything after it (later stages' inputs are its outputs)."""
    stages = pipeline_stages(req)
    for i, stage in enumerate(stages):
        if not ledger.reusable(stage, stage_inputs(stage, req.out, req, model_sha256)):
            return list(stages[i:])
    if not req.report and (req.out / REPORT_DIR).exists():
        return ["remove report (--no-report)"]
    return []


def run_export(req: ExportRequest) -> Path:
    from ptqd.model import resolve_model
    from ptqd.resume import StageLedger

    # options first: torch (ptqd.devices) takes seconds to import
    req.calibration.validate()
    settings = engine_settings(req.backend, req.batch)
    source = resolve_model(req.calibration.model)   # configs only: its family's defaults fill the request
    req = replace(req, calibration=req.calibration.for_model(source.family))
    from ptqd.devices import resolve_device

    device = resolve_device(req.device)  # refused even where the output is up to date
    ledger = StageLedger(req.out if (req.out / MANIFEST).is_file() else None)
    if ledger.old:
        redo = stages_to_redo(req, source.sha256, ledger)
        if not redo:
            click.echo(f"{req.out} is up to date: every stage's inputs are unchanged, nothing to do")
            return req.out
        if not req.force:
            raise UserError(f"output {req.out} exists and this run would change it (redo: {', '.join(redo)}); "
                            "pass --force to replace it")
    else:
        check_output_dir(req.out, req.force)
    model = load_model(source, req.calibration.steps, device)
    click.echo(f"model {model.source.spec} (sha256 {model.source.sha256[:12]}), torch on {device}")
    run_stage = {
        "calibrate": lambda root: stage_calibrate(root / CALIBRATION_DIR, req.calibration, model),
        "export": lambda root: stage_export(root / CALIBRATION_DIR, root, model),
        "engines": lambda root: stage_engines(root, req.backend, settings),
        "deploy": lambda root: stage_deploy(root),
        "report": lambda root: stage_report(root, req.report_samples),
    }
    with staged_directory(req.out) as root:
        stages = []
        for stage in pipeline_stages(req):
            key = stage_inputs(stage, root, req, model.source.sha256)
            if ledger.reusable(stage, key):
                ledger.reuse(stage, root)
                click.echo(f"[{stage}] inputs unchanged: reused from the previous {req.out}")
                result = _previous_engines(ledger) if stage == "engines" else None
            else:
                result = run_stage[stage](root)
            ledger.record(stage, key, root)
            stages.append(f"engines-{result}" if stage == "engines" else stage)
        update_manifest(root, stages, {**_config_dict(req.calibration), "backend": req.backend,
                                       "batch": req.batch}, model.source.sha256, ledger.records)
    click.echo(f"wrote {req.out}")
    if req.report:
        from ptqd.evaluation.report import print_headline

        print_headline(json.loads((req.out / REPORT_DIR / "metrics.json").read_text()),
                       req.out / REPORT_DIR / "report.html")
    return req.out


def _previous_engines(ledger) -> str:
    """A reused engines stage keeps the backend it was built with."""
    stages = read_manifest(ledger.previous).get("stages", [])
    return next((s.removeprefix("engines-") for s in stages if s.startswith("engines-")), "onnxruntime")


def run_calibrate(req: CalibrationRequest, out: Path, force: bool, device: str = "auto") -> Path:
    """`ptqd calibrate`: OUT/calibration alone, replacing an old one only with --force; torch
    runs on `device` (--device)."""
    from ptqd.model import resolve_model

    req.validate()  # options and the output first: torch (ptqd.devices) takes seconds to import
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; give a directory path")
    target = out / CALIBRATION_DIR
    if target.exists() and not force:
        raise UserError(f"{target} exists; pass --force to recalibrate")
    if not out.absolute().parent.exists():
        raise UserError(f"cannot create output {out}: {out.absolute().parent} does not exist")
    source = resolve_model(req.model)
    req = req.for_model(source.family)
    from ptqd.devices import resolve_device

    model = load_model(source, req.steps, resolve_device(device))
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
    update_manifest(out, [f"engines-{built}"], {"backend": backend, "batch": batch})
    click.echo(f"wrote {out / ENGINES_DIR}")


def run_deploy_stage(out: Path, unets: str, instances: int, force: bool, kubernetes: dict | None = None) -> None:
    """`ptqd deploy OUT`: OUT/triton from OUT/scheduler, OUT/engines and OUT/onnx; with
    `kubernetes` (deploy.kubernetes.plan_manifests' options) OUT/kubernetes beside it, both
    written or neither."""
    from ptqd.deploy.repository import UNET_MODES

    if unets not in UNET_MODES:
        raise UserError(f"--unets {unets!r}: expected one of {', '.join(UNET_MODES)}")
    if not out.is_dir():
        raise UserError(f"{out} is not an output directory (made by export-trt)")
    for name in [TRITON_DIR] + ([KUBERNETES_DIR] if kubernetes is not None else []):
        if (out / name).exists() and not force:
            raise UserError(f"{out / name} exists; pass --force to write it again")
    if kubernetes is not None:
        from ptqd.deploy.kubernetes import check_options

        check_options(**kubernetes)   # before the repository is built
    with staged_directory(out / TRITON_DIR) as staging:
        stage_deploy(out, unets, instances, dest=staging)
        if kubernetes is not None:
            from ptqd.deploy.kubernetes import plan_manifests, write_kubernetes

            plan = plan_manifests(out, staging, **kubernetes)
            with staged_directory(out / KUBERNETES_DIR) as manifests:
                write_kubernetes(plan, manifests)
    if kubernetes is None and (out / KUBERNETES_DIR).exists():
        # its image, GPU and sizes are the previous repository's; the user's own changes live in
        # an overlay that uses it, so it is left for them to rewrite, not removed
        click.echo(f"warning: {out / KUBERNETES_DIR} was written for the previous repository: "
                   "rewrite it with --kubernetes --force", err=True)
    update_manifest(out, ["deploy"], {"unets": unets, "instances": instances,
                                      **({"kubernetes": kubernetes} if kubernetes is not None else {})})
    click.echo(f"wrote {out / TRITON_DIR}" + (f" and {out / KUBERNETES_DIR}" if kubernetes is not None else ""))


def run_report_stage(out: Path, samples: int, seed: int, force: bool) -> None:
    """`ptqd report OUT`: OUT/report from the other stages' files."""
    from ptqd.evaluation.report import print_headline, write_report

    if not (out / CALIBRATION_DIR / "ptqd.json").is_file() or not (out / ENGINES_DIR).is_dir():
        raise UserError(f"{out} is not a complete output (made by export-trt): the report samples its engines")
    if (out / REPORT_DIR).exists() and not force:
        raise UserError(f"{out / REPORT_DIR} exists; pass --force to write it again")
    with staged_directory(out / REPORT_DIR) as staging:
        metrics = write_report(out, staging, samples, seed)
    update_manifest(out, ["report"], {})
    print_headline(metrics, out / REPORT_DIR / "report.html")
