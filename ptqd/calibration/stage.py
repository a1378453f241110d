"""The calibration stage: model -> OUT/calibration/ (quantization parameters, ptqd.json)."""
from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from ptqd.calibration.artifact import write_ptqd_json
from ptqd.calibration.configs import FLOAT_CONFIG, candidate_configs, is_kept
from ptqd.calibration.data import CalibrationData, collect, probe_predictions, probes
from ptqd.calibration.fakequant import fake_quant_unet
from ptqd.calibration.gptq import BLOCK, DAMP, reconstruct_weights
from ptqd.calibration.gpus import gpu_spec
from ptqd.calibration.latency import estimate_step_latency, same_cost
from ptqd.calibration.layers import measure_float_ops, measure_layers
from ptqd.calibration.mixed_precision import choose_schedule, config_bops, fp32_bops
from ptqd.calibration.noise_stats import StepStats, step_stats
from ptqd.calibration.params import ConfigQuant, calibrate_config, save_params
from ptqd.calibration.sensitivity import (SENSITIVITY_PROBES, SENSITIVITY_STEPS, layer_sensitivity, probe_mse,
                                          write_sensitivity)
from ptqd.calibration.request import CalibrationRequest
from ptqd.calibration.trajectory import chunk_engine
from ptqd.ddim import ddim_timeline
from ptqd.runtime.formats import quant_format
from ptqd.runtime.schedule import fold_step

# recorded (x_t, t) whose layer inputs build GPTQ's Hessians, spread over every step
GPTQ_PROBES = 256


def measure_noise(unet, quant, data: CalibrationData, n_fit: int, mode: str, bar,
                  conditioner=None) -> list[StepStats]:
    """Per step, the fake-quant model's (guided) eps on the recorded x_t against the recorded
    full-precision (guided) eps, in the chunks and conditions the trajectories were drawn with.
    The float configuration (fp16: no quantized layer) is the FP32 model itself, its noise zero
    without running it."""
    qmodel = fake_quant_unet(unet, quant) if quant.layers else None
    n, chunk = data.num_samples, data.batch
    engines = ([chunk_engine(qmodel, conditioner, start, min(chunk, n - start)) for start in range(0, n, chunk)]
               if qmodel is not None else [])
    out = []
    with torch.no_grad():
        for i, t in enumerate(data.timesteps):
            x, eps = data.x[i].numpy(), data.eps[i]  # one step read from the recorded file
            tt = np.full((n,), float(t), dtype=np.float32)
            eps_q = eps if qmodel is None else torch.from_numpy(
                np.concatenate([e(x[s:s + chunk], tt[s:s + chunk]) for e, s in zip(engines, range(0, n, chunk))]))
            delta = eps_q - eps
            out.append(step_stats(eps[:n_fit], delta[:n_fit], eps[n_fit:], delta[n_fit:], mode))
            bar.update(1)
    return out


def _step_noise(stats: list[StepStats], timeline, eta: float) -> list[float]:
    """Variance the leftover residual adds to x_{t-1}: (B_t sigma_q)^2 per step."""
    return [fold_step(s.index, s.timestep, "", s.alpha_t, s.alpha_prev, eta, st.k, [0.0],
                      st.sigma_q).B ** 2 * st.sigma_q ** 2 for s, st in zip(timeline, stats)]


def run_calibration(req: CalibrationRequest, model, folder: Path) -> dict:
    from ptqd.conditions import example_conditioning, latent_shape, pipeline_spec, torch_conditioner

    req = req.for_model(model.family)
    base, policy = req.validate()
    source, unet, sched_cfg = model.source, model.denoiser, model.scheduler_config
    spec = pipeline_spec(model, req.guidance_scale, req.conditions)
    conditioner = torch_conditioner(model, spec)
    configs = candidate_configs(base, list(req.extra_configs))
    start = time.perf_counter()
    example = example_conditioning(model, spec, 1)
    layers = measure_layers(unet, tuple(latent_shape(unet)), example)
    # one image per UNet call (two samples when guided); known before minutes of calibration
    latency_batch = 2 if spec.guided else 1
    latency = estimate_step_latency(layers, measure_float_ops(unet, tuple(latent_shape(unet)), example),
                                    [c.name for c in configs], req.keep, batch=latency_batch, gpu=req.target_gpu)
    quantized = [layer.name for layer in layers if not is_kept(layer.name, req.keep)]
    data = collect(unet, sched_cfg, req.steps, req.eta, req.calib_samples, req.seed, quantized,
                   batch_size=req.calib_batch, conditioner=conditioner)
    searched: dict = {}
    quants = [calibrate_config(unet, cfg, data, req.keep, searched) for cfg in configs]
    reconstruction = _reconstruct(unet, quants, data, req.rounding, conditioner)
    n_fit = max(4, req.calib_samples * 3 // 4)
    stats = {}
    with tqdm(total=len(configs) * req.steps, desc="PTQD statistics", unit="step",
              leave=False, disable=None) as bar:
        for cfg, quant in zip(configs, quants):
            stats[cfg.name] = measure_noise(unet, quant, data, n_fit, req.correction, bar, conditioner)
    timeline = ddim_timeline(sched_cfg, req.steps)
    bops = {c.name: config_bops(layers, c, req.keep) for c in configs}
    noise = {name: _step_noise(s, timeline, req.eta) for name, s in stats.items()}
    snr = {name: [st.snr_db for st in s] for name, s in stats.items()}
    schedule = choose_schedule(policy, base.name, snr, noise, bops, latency)
    sensitivity = (_sensitivity(unet, quants[configs.index(base)], data, layers, conditioner)
                   if req.sensitivity else None)
    doc = _document(req, source, base, policy, configs, quants, layers, timeline, stats, bops,
                    schedule, time.perf_counter() - start)
    doc["conditioning"] = {"kind": spec.kind, "guidance_scale": spec.guidance_scale,
                           "calibration_conditions": spec.default_conditions}
    doc["weight_rounding"] = reconstruction
    doc["latency"] = _latency_doc(latency, schedule, req.target_gpu, latency_batch)
    folder.mkdir(parents=True, exist_ok=True)
    save_params(folder, quants, req.keep)
    if sensitivity is not None:
        write_sensitivity(folder, sensitivity)
    write_ptqd_json(folder, doc)
    print_summary(doc)
    if sensitivity is not None:
        print_sensitivity(sensitivity)
    return doc


def _latency_doc(latency: dict[str, float], schedule: list[str], gpu: str, batch: int) -> dict:
    """Estimated step latencies and what the schedule costs against all-FP16 on the target."""
    total = sum(latency[c] for c in schedule)
    return {"kind": "estimated", "method": "roofline per layer from datasheet peaks (calibration/latency.py)",
            "target_gpu": gpu_spec(gpu).label, "batch": batch, "ms_per_step": latency,
            "schedule_ms": total, "fp16_schedule_ms": latency["fp16"] * len(schedule),
            "speedup_vs_fp16": latency["fp16"] * len(schedule) / total,
            "same_cost": same_cost({c: latency[c] for c in set(schedule)})}


def _reconstruct(unet, quants: list[ConfigQuant], data: CalibrationData, rounding: str, conditioner) -> dict:
    """GPTQ (when asked) on every configuration's weights; what was done, for ptqd.json."""
    if rounding != "gptq":
        return {"method": "nearest"}
    start = time.perf_counter()
    blocks = probes(data, GPTQ_PROBES)
    click.echo(f"GPTQ weight reconstruction ({sum(b.count for b in blocks)} recorded inputs over "
               f"{len(blocks)} steps) ...", err=True)

    def run_probes():
        for _ in probe_predictions(unet, data, blocks, conditioner):
            pass

    reconstruct_weights(unet, quants, run_probes)
    return {"method": "gptq", "probes": sum(b.count for b in blocks), "damp": DAMP, "block": BLOCK,
            "seconds": round(time.perf_counter() - start, 1)}


def _sensitivity(unet, quant: ConfigQuant, data: CalibrationData, layers, conditioner) -> dict:
    blocks = probes(data, SENSITIVITY_PROBES, SENSITIVITY_STEPS)
    everything = probe_mse(fake_quant_unet(unet, quant), data, blocks, conditioner)
    return layer_sensitivity(unet, quant, data, blocks, layers, conditioner, all_layers_mse=everything)


def print_sensitivity(doc: dict, top: int = 5) -> None:
    share = lambda rows: sum(r["macs_share"] for r in rows)
    rows = doc["layers"][:top]
    click.echo(f"most sensitive layers ({doc['config']}, eps MSE with only that layer quantized; all layers "
               f"{doc['all_layers_mse']:.2e}; full map in calibration/sensitivity.json):")
    for r in rows:
        click.echo(f"  {r['mse']:.2e}  {r['macs_share'] * 100:4.1f} % MACs  {r['layer']}")
    click.echo(f"  (these {len(rows)} hold {share(rows) * 100:.1f} % of the denoiser's Conv/Linear MACs)")


def _document(req, source, base, policy, configs, quants, layers, timeline, stats, bops, schedule, seconds):
    total_fp = fp32_bops(layers) * req.steps
    total = sum(bops[c] for c in schedule)
    step_docs = []
    for tl, cfg in zip(timeline, schedule):
        st = stats[cfg][tl.index]
        step_docs.append({"index": tl.index, "timestep": tl.timestep, "config": cfg, "k": st.k,
                          "bias": st.bias, "sigma_q": st.sigma_q, "correction": st.correction})
    return {
        "model": source.spec, "model_sha256": source.sha256,
        "num_inference_steps": req.steps, "eta": req.eta, "seed": req.seed,
        "calib_samples": req.calib_samples, "base_config": base.name,
        "correction_mode": req.correction, "keep_patterns": list(req.keep),
        "configs": {c.name: {"weight_bits": c.weight_bits, "act_bits": c.act_bits, "format": c.fmt,
                             "bops_per_step": bops[c.name], "quantized_layers": len(q.layers),
                             "kept_layers": sorted(q.kept)} for c, q in zip(configs, quants)},
        "fp32_bops_per_step": fp32_bops(layers),
        "mixed_precision": {"policy": str(policy), "bops_total": total, "fp32_bops_total": total_fp,
                            "saving_vs_fp32": total_fp / total,
                            "counts": {c: schedule.count(c) for c in sorted(set(schedule))}},
        "steps": step_docs,
        "stats": {name: [{"index": tl.index, "timestep": tl.timestep, **vars(st)}
                         for tl, st in zip(timeline, per_step)] for name, per_step in stats.items()},
        "calibration_seconds": round(seconds, 1),
        "float_config": FLOAT_CONFIG,
    }


def print_summary(doc: dict) -> None:
    click.echo(f"{'config':8} {'mean k':>8} {'mean |bias|':>11} {'mean σ_q':>9} "
               f"{'SNR dB (naive→PTQD)':>20} {'BOPs/step':>11}")
    for name, per_step in doc["stats"].items():
        if not quant_format(doc["configs"][name].get("format", "int")).quantized:
            # its statistics are measured on the FP32 torch model: zero by construction
            click.echo(f"{name:8} {'float engine, no quantization noise':>51} "
                       f"{doc['configs'][name]['bops_per_step']:11.3e}")
            continue
        n = len(per_step)
        k = sum(s["k"] for s in per_step) / n
        b = sum(sum(abs(v) for v in s["bias"]) / len(s["bias"]) for s in per_step) / n
        sq = sum(s["sigma_q"] for s in per_step) / n
        before = sum(s["snr_db_uncorrected"] for s in per_step) / n
        after = sum(s["snr_db"] for s in per_step) / n
        click.echo(f"{name:8} {k:8.4f} {b:11.5f} {sq:9.4f} {before:9.2f} → {after:7.2f} "
                   f"{doc['configs'][name]['bops_per_step']:11.3e}")
    mp = doc["mixed_precision"]
    runs = ", ".join(f"{c}×{n}" for c, n in mp["counts"].items())
    click.echo(f"schedule ({mp['policy']}): {runs}; BOPs {mp['bops_total']:.3e}, "
               f"{mp['saving_vs_fp32']:.1f}× fewer than FP32; calibration {doc['calibration_seconds']} s")
    lat = doc["latency"]
    per = ", ".join(f"{c} {ms * 1e3:.1f} µs" for c, ms in lat["ms_per_step"].items())
    click.echo(f"latency per step on {lat['target_gpu']} (estimated, batch {lat['batch']}): {per}; "
               f"schedule {lat['schedule_ms']:.3f} ms, {lat['speedup_vs_fp16']:.2f}× faster than all-FP16")
    for group in lat["same_cost"]:
        click.echo(f"note: the schedule mixes {' and '.join(sorted(group))}, which cost the same on "
                   f"{lat['target_gpu']} (same kernels); its BOPs difference is not a GPU saving")
