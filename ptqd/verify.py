"""`ptqd verify OUT`: is what is in OUT what was built?

Checks every artifact against manifest.json (present, size, sha256), files nobody listed,
and that the stages agree on their configurations: calibration's schedule, the graphs, the
folded scheduler, the engines and the Triton repository. Each problem is one line naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path

from ptqd.errors import UserError
from ptqd.runtime.conditioning import PipelineSpec
from ptqd.runtime.layout import (DENOISER_ROLE, GRAPH_FILES, ORT_MANIFEST, SCHEDULE_FILE, SPEC_FILE, deployment,
                                 denoiser_model_name, graph_files, graph_path)
from ptqd.output import MANIFEST, file_sha256, graph_sha256, is_artifact


def check_artifacts(out: Path, manifest: dict) -> list[str]:
    problems = []
    listed = set()
    for entry in manifest.get("artifacts", []):
        path = out / entry["path"]
        listed.add(entry["path"])
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['path']}: size {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 differs from the manifest (the file was changed)")
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(out).as_posix()
        if rel not in listed and is_artifact(path.relative_to(out)):
            problems.append(f"{rel}: not in the manifest")
    return problems


def _load_json(out: Path, rel: str, problems: list[str]) -> dict | None:
    path = out / rel
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        problems.append(f"{rel}: not valid JSON")
        return None


def _spec(out: Path) -> PipelineSpec:
    """OUT's pipeline.json (an unreadable one: the default; _check_pipeline_spec says so)."""
    try:
        return PipelineSpec.load(out / "scheduler")
    except (OSError, ValueError, TypeError):
        return PipelineSpec()


def _graphs(out: Path, spec: PipelineSpec, configs: list[str]):
    """The deployment of OUT's spec for `configs` (the sample shape from OUT's schedule)."""
    table = _load_json(out, f"scheduler/{SCHEDULE_FILE}", []) or {}
    return deployment(spec, table.get("sample_shape", []), configs)


def check_consistency(out: Path, manifest: dict) -> list[str]:
    problems: list[str] = []
    doc = _load_json(out, "calibration/ptqd.json", problems)
    if doc is None:
        return problems
    if manifest.get("model_sha256") and doc.get("model_sha256") != manifest["model_sha256"]:
        problems.append("calibration/ptqd.json: made from another model than manifest.json records")
    scheduled = sorted({s["config"] for s in doc.get("steps", [])})
    spec = _spec(out)
    for cfg in doc.get("configs", {}):
        for flavour in GRAPH_FILES:
            path = graph_path(out / "onnx", cfg, flavour, spec.denoiser)
            if (out / "onnx").is_dir() and not path.is_file():
                problems.append(f"onnx/{path.name}: missing for calibrated configuration {cfg}")
    table = _load_json(out, "scheduler/ptqd_schedule.json", problems)
    if table is not None:
        if [s["config"] for s in table["steps"]] != [s["config"] for s in doc["steps"]]:
            problems.append("scheduler/ptqd_schedule.json: its engine per step differs from calibration/ptqd.json")
        if [s["timestep"] for s in table["steps"]] != [s["timestep"] for s in doc["steps"]]:
            problems.append("scheduler/ptqd_schedule.json: its timesteps differ from calibration/ptqd.json")
        for s_table, s_cal in zip(table["steps"], doc["steps"]):
            if abs(s_table["k"] - s_cal["k"]) > 1e-12:
                problems.append(f"scheduler/ptqd_schedule.json: step {s_cal['index']} k {s_table['k']} "
                                f"!= calibration's {s_cal['k']}")
                break
    problems += _check_pipeline_spec(out, doc, spec)
    engines = _load_json(out, f"engines/{ORT_MANIFEST}", problems)
    # beside the denoiser's engines (keyed by configuration): the decoder's and encoders' (by name)
    extra = {g.name for g in _graphs(out, spec, []) if g.role != DENOISER_ROLE}
    if engines is not None and sorted(k for k in engines.get("engines", {}) if k not in extra) != scheduled:
        problems.append(f"engines/{ORT_MANIFEST}: engines for {sorted(engines['engines'])}, "
                        f"the schedule uses {scheduled}")
    problems += _check_plans(out, scheduled, spec.denoiser)
    if (out / "triton").is_dir():
        problems += check_triton(out, scheduled, spec)
    return problems


def _same_file(out: Path, copy: Path, original: Path) -> list[str]:
    """`copy` equals `original`; for a graph, its external-data file too (beside the copy, under
    the name the graph records)."""
    rel = copy.relative_to(out).as_posix()
    if not copy.is_file():
        return [f"{rel}: missing"]
    if not original.is_file() or file_sha256(copy) != file_sha256(original):
        return [f"{rel}: differs from {original.relative_to(out).as_posix()} (redeploy: `ptqd deploy {out.name} --force`)"]
    return [p for c in graph_files(original)[1:] for p in _same_file(out, copy.parent / c.name, c)]


def check_triton(out: Path, scheduled: list[str], spec: PipelineSpec) -> list[str]:
    """Every config.pbtxt as Triton parses it; the repository runs the schedule, graphs and
    plans that the other stages hold (a rebuild without a redeploy shows up here)."""
    from ptqd.deploy.model_config import CONFIG_FILE, parse_config
    from ptqd.deploy.repository import SAMPLER, copy_spec_files

    problems, configs = [], {}
    for path in sorted((out / "triton").glob(f"*/{CONFIG_FILE}")):
        rel = path.relative_to(out).as_posix()
        try:
            configs[path.parent.name] = config = parse_config(path.read_text())
        except Exception as exc:  # protobuf's ParseError, or undecodable bytes
            problems.append(f"{rel}: Triton would reject it ({str(exc).splitlines()[0][:160]})")
            continue
        if config.name and config.name != path.parent.name:
            problems.append(f"{rel}: names model {config.name!r} in folder {path.parent.name!r}")
    sampler = configs.get(SAMPLER)
    if sampler is None:
        return problems + [f"triton/{SAMPLER}/{CONFIG_FILE}: missing or unreadable"]
    version = out / "triton" / SAMPLER / "1"
    problems += _same_file(out, version / SCHEDULE_FILE, out / "scheduler" / SCHEDULE_FILE)
    unets = sampler.parameters["unets"].string_value if "unets" in sampler.parameters else ""
    for original, copy in copy_spec_files(out / "scheduler", version, spec):
        problems += _same_file(out, copy, original)
    for g in _graphs(out, spec, scheduled):
        name, plan, graph = g.name, out / "engines" / g.plan_name, out / "onnx" / g.cpu_graph
        if unets == "in-process":
            problems += _same_file(out, version / "onnx" / graph.name, graph)
        elif name not in configs:
            problems.append(f"triton/{name}: missing, the pipeline runs onnx/{graph.name}")
        elif configs[name].platform == "tensorrt_plan":
            problems += _same_file(out, out / "triton" / name / "1" / "model.plan", plan)
        else:
            problems += _same_file(out, out / "triton" / name / "1" / "model.onnx", graph)
    return problems


def _check_pipeline_spec(out: Path, doc: dict, spec: PipelineSpec) -> list[str]:
    """A conditional / latent model's pipeline.json against the calibration and the graphs."""
    problems: list[str] = []
    raw = _load_json(out, f"scheduler/{SPEC_FILE}", problems)
    cond = doc.get("conditioning") or {}
    if raw is None:
        kind = cond.get("kind", "unconditional")
        if problems or kind == "unconditional" or not (out / "scheduler").is_dir():
            return problems
        return [f"scheduler/{SPEC_FILE}: missing, calibration/ptqd.json is for a {kind}-conditioned model"]
    if spec.guidance_scale != cond.get("guidance_scale", 1.0):
        problems.append(f"scheduler/{SPEC_FILE}: guidance scale {spec.guidance_scale} differs from the "
                        f"{cond.get('guidance_scale')} calibration/ptqd.json was calibrated with")
    needed = dict.fromkeys(name for g in _graphs(out, spec, []) for name in (g.cpu_graph, g.tensorrt_graph))
    problems += [f"onnx/{name}: missing, scheduler/{SPEC_FILE} needs it" for name in needed
                 if (out / "onnx").is_dir() and not (out / "onnx" / name).is_file()]
    return problems


def _check_plans(out: Path, scheduled: list[str], denoiser: str) -> list[str]:
    problems = []
    plans = sorted((out / "engines").glob("*.plan")) if (out / "engines").is_dir() else []
    for plan in plans:
        meta_path = plan.with_suffix(".json")
        if not meta_path.is_file():
            problems.append(f"engines/{plan.name}: no metadata beside it")
            continue
        meta = json.loads(meta_path.read_text())
        onnx = out / "onnx" / meta.get("source_onnx", "")
        if not onnx.is_file() or graph_sha256(onnx) != meta.get("source_onnx_sha256"):
            problems.append(f"engines/{plan.name}: built from another onnx/{meta.get('source_onnx')}")
        try:
            import tensorrt

            if tensorrt.__version__ != meta.get("tensorrt_version"):
                problems.append(f"engines/{plan.name}: built with TensorRT {meta.get('tensorrt_version')}, "
                                f"this machine has {tensorrt.__version__}")
        except ImportError:
            pass
    prefix = denoiser_model_name(denoiser, "")
    unets = [p for p in plans if p.stem.startswith(prefix)]
    if unets and sorted(p.stem.removeprefix(prefix) for p in unets) != scheduled:
        problems.append(f"engines/: plans for {[p.stem for p in plans]}, the schedule uses {scheduled}")
    return problems


def verify(out: Path) -> list[str]:
    if not out.is_dir():
        raise UserError(f"{out} is not an output directory")
    if not (out / MANIFEST).is_file():
        raise UserError(f"{out} has no {MANIFEST}: it was not made by ptqd (or is incomplete)")
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except ValueError:
        return [f"{MANIFEST}: not valid JSON"]
    if not isinstance(manifest, dict):
        return [f"{MANIFEST}: not a JSON object"]
    return check_artifacts(out, manifest) + check_consistency(out, manifest)
