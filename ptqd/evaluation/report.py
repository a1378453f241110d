"""The report stage: OUT -> OUT/report/{metrics.json, *.png, report.html}.

What quantization cost and what PTQD won back, per variant and per step, on the same seeds:
a distribution metric (Fréchet distance in the shipped digits classifier's features, for the
built-in model), per-sample error to the FP32 sample of the same seed, the per-step noise
statistics and schedule from calibration, BOPs, sizes and timings.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import numpy as np

from ptqd.evaluation import plots
from ptqd.evaluation.measure import sample_variant, step_errors, variants_for
from ptqd.evaluation.metrics import per_sample_error

REPORT_DIR = "report"
DEFAULT_SAMPLES = 64
GRID_SAMPLES = 16
PLOTS = ("noise_statistics", "snr", "schedule", "step_error", "samples")


def _per_config_steps(doc: dict) -> dict[str, list[dict]]:
    return {cfg: [{"index": r["index"], "timestep": r["timestep"], "k": r["k"],
                   "bias_abs": float(np.mean(np.abs(r["bias"]))), "sigma_q": r["sigma_q"],
                   "snr_before_db": r["snr_db_uncorrected"], "snr_after_db": r["snr_db"],
                   "correction": r["correction"]} for r in rows]
            for cfg, rows in doc["stats"].items()}


def _distribution(doc: dict):
    """(name, feature function, reference features) or (None, None, why not)."""
    from ptqd.model import resolve_model

    source = resolve_model(doc["model"])
    if source.extras_dir is None:
        return (None, None, "not computed: ptqd ships a feature network only with the built-in model, and "
                "no FID weights (Inception) can be downloaded here; per-sample error to FP32 is reported")
    from ptqd.evaluation.metrics import DigitFeatures, real_digit_features

    features = DigitFeatures(source.extras_dir)
    return ("Fréchet distance to the real digits in the shipped digits classifier's features "
            "(lower is better)", features, real_digit_features(features))


def _sizes(out: Path, doc: dict, scheduled: list[str], denoiser: str) -> dict:
    from ptqd.model import resolve_model
    from ptqd.runtime.layout import GRAPH_FILES, denoiser_model_name, graph_path

    onnx = out / "onnx"
    size = lambda p: p.stat().st_size if p.is_file() else None
    plans = sorted((out / "engines").glob(f"{denoiser_model_name(denoiser, '*')}.plan"))
    sizes = {"model_weights": size(resolve_model(doc["model"]).weights),
             "fp32_onnx": size(graph_path(onnx, "fp32", "tensorrt", denoiser)),
             "graphs": {cfg: {flavour: size(graph_path(onnx, cfg, flavour, denoiser)) for flavour in GRAPH_FILES}
                        for cfg in doc["configs"]},
             "plans": {p.stem: p.stat().st_size for p in plans}}
    sizes["deployed"] = sum(sizes["graphs"][c]["tensorrt"] or 0 for c in scheduled)
    return sizes


def _engines(out: Path) -> dict:
    plans = sorted(p.name for p in (out / "engines").glob("*.plan"))
    if plans:
        return {"tensorrt": f"built: {', '.join(plans)}", "report_sampling": "onnxruntime (CPU-fast graphs)"}
    return {"tensorrt": "not built: TensorRT is not installed on the machine that ran export-trt; "
                        "engines/build_engines.sh builds the plans in NVIDIA's TensorRT container",
            "report_sampling": "onnxruntime (CPU-fast graphs)"}


def _triton(out: Path) -> str:
    config = out / "triton" / "ptqd_sampler" / "config.pbtxt"
    if not config.is_file():
        return "not written"
    from ptqd.deploy.model_config import parse_config

    unets = parse_config(config.read_text()).parameters["unets"].string_value
    return f"triton/ptqd_sampler with denoisers {unets}"


def _sample_all(out: Path, doc: dict, num: int, seed: int) -> list:
    from tqdm import tqdm

    variants = variants_for(list(doc["configs"]))
    total = len(variants) * num * len(doc["steps"])
    with tqdm(total=total, unit="img-step", disable=None, desc="report", leave=False) as bar:
        for v in variants:
            sample_variant(out, v, num, seed, on_progress=bar.update)
    return variants


def asked_labels(spec, num: int) -> np.ndarray | None:
    """The class image j of a report's samples was asked for (the calibrated classes, j % count,
    as `ptqd sample` conditions them); None for a model that takes no class."""
    if spec.kind != "class":
        return None
    return np.array([spec.default_conditions[j % len(spec.default_conditions)] for j in range(num)])


def _variant_rows(variants: list, num: int, features, reference, labels: np.ndarray | None) -> dict:
    """Per variant: error to the same-seed FP32 sample, distribution metric, for a class model
    the shipped classifier's accuracy on the label each image was asked for, sampling time."""
    from ptqd.evaluation.metrics import frechet_distance

    fp = variants[0]
    rows = {}
    for v in variants:
        row = {"precision": v.precision, "ptqd_correction": v.correction, "sampling_seconds": round(v.seconds, 3),
               "images_per_second": round(num / v.seconds, 2)}
        if v is not fp:
            row.update(per_sample_error(v.images, fp.images))
        if features is not None:
            row["frechet_distance"] = frechet_distance(features(v.images), reference)
            if labels is not None:
                row["class_accuracy"] = float((features.predict(v.images) == labels).mean())
        rows[v.name] = row
    return rows


def _schedule_steps(doc: dict, per_config: dict, errors: dict[str, list[float]]) -> list[dict]:
    """The deployed schedule step by step: what ran, its noise statistics, the latent drift."""
    rows = []
    for i, s in enumerate(doc["steps"]):
        stats = per_config[s["config"]][i]
        rows.append({"index": s["index"], "timestep": s["timestep"], "config": s["config"], "k": s["k"],
                     "bias_abs": float(np.mean(np.abs(s["bias"]))), "sigma_q": s["sigma_q"],
                     "correction": s["correction"], "snr_before_db": stats["snr_before_db"],
                     "snr_after_db": stats["snr_after_db"],
                     **{f"latent_mse_{name}": errors[name][i] for name in errors}})
    return rows


def _bops(doc: dict) -> dict:
    mp = doc["mixed_precision"]
    return {"fp32_per_step": doc["fp32_bops_per_step"],
            "per_step": {c: d["bops_per_step"] for c, d in doc["configs"].items()},
            "schedule_total": mp["bops_total"], "fp32_total": mp["fp32_bops_total"],
            "saving_vs_fp32": mp["saving_vs_fp32"], "policy": mp["policy"], "counts": mp["counts"]}


def _figures(doc: dict, variants: list, steps: list[dict], per_config: dict, errors: dict) -> dict[str, bytes]:
    from ptqd.images import grid_array

    by_name = {v.name: v for v in variants}
    grids = {title: grid_array(by_name[key].images[:GRID_SAMPLES])
             for title, key in (("FP32", "fp32"), ("mixed, naive", "mixed"), ("mixed, PTQD", "mixed+ptqd"))}
    return {"noise_statistics": plots.noise_statistics(steps, per_config), "snr": plots.snr(per_config),
            "schedule": plots.schedule(steps, sorted(doc["configs"])), "step_error": plots.step_error(errors),
            "samples": plots.sample_grids(grids)}


def _latency(out: Path, doc: dict, denoiser: str) -> dict | None:
    """Step latency per configuration: measured where TensorRT plans were timed
    (engines/<denoiser>_<cfg>.timing.json), else calibration's roofline estimate; the schedule's
    total and its speed-up over all-FP16 from the same source where every configuration has one."""
    from ptqd.engines.timing import measured_latencies

    est = doc.get("latency")
    if est is None:
        return None
    measured = measured_latencies(out / "engines", denoiser)
    rows = {c: {"ms": ms, "source": f"estimated ({est['target_gpu']}, batch {est['batch']})"}
            for c, ms in est["ms_per_step"].items()}
    for cfg, rec in measured.items():
        rows[cfg] = {"ms": rec["median_ms"], "source": f"measured ({rec.get('gpu', '?')}, batch {rec['batch']}, "
                                                     f"{rec.get('measured_by', '?')})"}
    schedule = [s["config"] for s in doc["steps"]]
    source = "measured" if all(c in measured for c in set(schedule) | {"fp16"}) else "estimated"
    pick = {c: (measured[c]["median_ms"] if source == "measured" else est["ms_per_step"][c])
            for c in set(schedule) | {"fp16"}}
    total = sum(pick[c] for c in schedule)
    return {"per_config": rows, "schedule_ms": total, "source": source,
            "speedup_vs_fp16": pick["fp16"] * len(schedule) / total, "same_cost": est.get("same_cost", [])}


def _sensitivity(out: Path, top: int = 10) -> dict | None:
    """The most sensitive layers of calibration/sensitivity.json (None for an older calibration)."""
    from ptqd.calibration.sensitivity import SENSITIVITY_JSON

    path = out / "calibration" / SENSITIVITY_JSON
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return {"config": doc["config"], "method": doc["method"], "probes": doc["probes"],
            "all_layers_mse": doc["all_layers_mse"], "layers_total": len(doc["layers"]), "top": doc["layers"][:top]}


def measure(out: Path, num: int, seed: int) -> tuple[dict, dict[str, bytes]]:
    from ptqd.calibration.artifact import load_ptqd_json
    from ptqd.model import resolve_model

    from ptqd.runtime.conditioning import PipelineSpec

    doc = load_ptqd_json(out / "calibration")
    resolve_model(doc["model"])  # before minutes of sampling: the distribution metric reads its classifier
    spec = PipelineSpec.load(out / "scheduler")
    denoiser = spec.denoiser
    variants = _sample_all(out, doc, num, seed)
    dist_name, features, reference = _distribution(doc)
    rows = _variant_rows(variants, num, features, reference, asked_labels(spec, num))
    errors = {v.name: step_errors(v, variants[0]) for v in variants if v.precision == "mixed"}
    per_config = _per_config_steps(doc)
    steps = _schedule_steps(doc, per_config, errors)
    metrics = {
        "format_version": 1, "model": doc["model"], "model_sha256": doc["model_sha256"],
        "num_inference_steps": len(doc["steps"]), "eta": doc["eta"], "samples": num, "seed": seed,
        "distribution_metric": dist_name or reference,
        "variants": rows, "steps": steps, "per_config_steps": per_config, "bops": _bops(doc),
        "sizes": _sizes(out, doc, sorted({s["config"] for s in doc["steps"]}), denoiser),
        "timings": {"calibration_seconds": doc["calibration_seconds"],
                    "sampling_seconds": {n: r["sampling_seconds"] for n, r in rows.items()}},
        "engines": _engines(out), "triton": _triton(out),
        "weight_rounding": doc.get("weight_rounding", {"method": "nearest"}), "sensitivity": _sensitivity(out),
        "latency": _latency(out, doc, denoiser),
    }
    metrics["headline"] = headline(metrics)
    return metrics, _figures(doc, variants, steps, per_config, errors)


def headline(metrics: dict) -> dict:
    """The three numbers a user wants first: quality vs FP32, BOPs saving, size saving."""
    rows = metrics["variants"]
    ptqd, naive, fp = rows["mixed+ptqd"], rows["mixed"], rows["fp32"]
    if "frechet_distance" in fp:
        quality = (f"FD {ptqd['frechet_distance']:.2f} with PTQD vs {fp['frechet_distance']:.2f} FP32 "
                   f"({naive['frechet_distance']:.2f} without the correction); MSE to FP32 "
                   f"{ptqd['mse']:.2e} vs {naive['mse']:.2e} naive")
        if "class_accuracy" in fp:
            quality += (f"; class accuracy {ptqd['class_accuracy'] * 100:.1f} % with PTQD vs "
                        f"{fp['class_accuracy'] * 100:.1f} % FP32")
    else:
        quality = f"MSE to FP32 {ptqd['mse']:.2e} with PTQD vs {naive['mse']:.2e} naive (PSNR {ptqd['psnr_db']:.1f} dB)"
    sizes = metrics["sizes"]
    size_ratio = sizes["fp32_onnx"] / sizes["deployed"] if sizes["deployed"] else math.nan
    return {"quality": quality,
            "bops": f"{metrics['bops']['saving_vs_fp32']:.1f}x fewer BOPs than FP32 over the schedule",
            "size": (f"{size_ratio:.1f}x smaller: {sizes['deployed'] / 1e6:.2f} MB of graphs for the "
                     f"{len(metrics['bops']['counts'])} configuration(s) the schedule runs vs "
                     f"{sizes['fp32_onnx'] / 1e6:.2f} MB FP32")}


def write_report(out: Path, dest: Path, num: int = DEFAULT_SAMPLES, seed: int = 0) -> dict:
    """Fill dest (empty) with metrics.json, the PNG plots and report.html; returns the metrics."""
    from ptqd.evaluation.page import render

    started = time.perf_counter()
    metrics, images = measure(out, num, seed)
    metrics["timings"]["report_seconds"] = round(time.perf_counter() - started, 1)
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (dest / f"{name}.png").write_bytes(data)
    (dest / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False) + "\n")
    (dest / "report.html").write_text(render(metrics, images))
    return metrics


def print_headline(metrics: dict, path: Path) -> None:
    h = metrics["headline"]
    click.echo(f"report: {path}")
    click.echo(f"  quality: {h['quality']}")
    click.echo(f"  compute: {h['bops']}")
    click.echo(f"  size:    {h['size']}")
