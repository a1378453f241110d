"""report.html: one self-contained page (plots embedded as data URIs, no external requests)."""
from __future__ import annotations

import base64
import html

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.headline { background: #f3f7ff; border: 1px solid #c9d8f5; padding: 0.8em 1.2em; }
.scroll { max-height: 420px; overflow-y: auto; display: inline-block; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _num(value, fmt: str = ".4g") -> str:
    return "—" if value is None else format(value, fmt)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    data = base64.b64encode(images[name]).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _variants(m: dict) -> str:
    classes = any("class_accuracy" in r for r in m["variants"].values())
    rows = []
    for name, r in m["variants"].items():
        rows.append([name, _num(r.get("frechet_distance"), ".2f"), _num(r.get("mse"), ".3e"),
                     _num(r.get("psnr_db"), ".2f"), _num(r["images_per_second"], ".1f")]
                    + ([_num(r.get("class_accuracy"), ".3f")] if classes else []))
    return _table(["variant", "Fréchet distance", "MSE to FP32", "PSNR to FP32 (dB)", "images/s"]
                  + (["class accuracy"] if classes else []), rows)


def _steps(m: dict) -> str:
    names = [k for k in m["steps"][0] if k.startswith("latent_mse_")]
    rows = [[s["index"], s["timestep"], s["config"], _num(s["k"]), _num(s["bias_abs"]), _num(s["sigma_q"]),
             _num(s["snr_before_db"], ".2f"), _num(s["snr_after_db"], ".2f"), s["correction"],
             *(_num(s[n], ".2e") for n in names)] for s in m["steps"]]
    header = ["step", "t", "config", "k", "mean |bias|", "σ_q", "SNR naive dB", "SNR PTQD dB", "correction",
              *(f"x_t MSE {n.removeprefix('latent_mse_')}" for n in names)]
    return f'<div class="scroll">{_table(header, rows)}</div>'


def _costs(m: dict) -> str:
    b, s = m["bops"], m["sizes"]
    bops_rows = [["fp32", f"{b['fp32_per_step']:.3e}", "1.0x"]]
    bops_rows += [[c, f"{v:.3e}", f"{b['fp32_per_step'] / v:.1f}x"] for c, v in b["per_step"].items()]
    bops_rows.append([f"schedule ({b['policy']})", f"{b['schedule_total'] / m['num_inference_steps']:.3e} (mean)",
                      f"{b['saving_vs_fp32']:.1f}x"])
    size_rows = [["model weights (diffusers)", _num(s["model_weights"] and s["model_weights"] / 1e6, ".2f"), "", ""],
                 ["fp32 (the denoiser's FP32 graph)", f"{s['fp32_onnx'] / 1e6:.2f}", "", ""]]
    for cfg, flavours in s["graphs"].items():
        size_rows.append([cfg, *(_num(flavours[f] / 1e6 if flavours[f] else None, ".2f")
                                 for f in ("tensorrt", "onnxruntime", "cpu-fast"))])
    plans = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in s["plans"].items()) or "none built"
    return (_table(["configuration", "BOPs per step", "saving vs FP32"], bops_rows) + _latency(m)
            + _table(["graph (MB)", "TensorRT flavour", "ONNX Runtime INT4 reference", "CPU-fast"], size_rows)
            + f'<p class="note">TensorRT plans: {_e(plans)}.</p>')


def _latency(m: dict) -> str:
    lat = m.get("latency")
    if lat is None:
        return ""
    rows = [[c, f"{r['ms'] * 1e3:.2f}", r["source"]] for c, r in lat["per_config"].items()]
    same = "".join(f" The schedule mixes {' and '.join(g)}, which cost the same on the target: their BOPs "
                   "difference is no GPU saving." for g in lat["same_cost"])
    return (_table(["configuration", "UNet step latency (µs)", "source"], rows)
            + f'<p class="note">Schedule: {lat["schedule_ms"]:.3f} ms of UNet time ({lat["source"]}), '
              f'{lat["speedup_vs_fp16"]:.2f}× faster than all-FP16.{_e(same)}</p>')


def _sensitivity(m: dict) -> str:
    s = m.get("sensitivity")
    rounding = m.get("weight_rounding", {}).get("method", "nearest")
    if s is None:
        return ('<p class="note">Not recorded by this calibration (made with <code>--no-sensitivity</code>, '
                'or before ptqd measured it).</p>')
    rows = [[r["layer"], r["kind"], f"{r['mse']:.2e}", f"{r['macs_share'] * 100:.1f} %"] for r in s["top"]]
    return (f'<p class="note">{_e(s["config"])}, weights {_e(rounding)}: {_e(s["method"])} ({s["probes"]} '
            f'probes). All {s["layers_total"]} quantized layers together: {s["all_layers_mse"]:.2e}. The '
            f'{len(rows)} most sensitive layers, candidates for <code>--keep</code>:</p>'
            + _table(["layer", "kind", "eps MSE, only this layer quantized", "share of MACs"], rows))


def render(m: dict, images: dict[str, bytes]) -> str:
    h = m["headline"]
    counts = ", ".join(f"{c}×{n}" for c, n in m["bops"]["counts"].items())
    timing = ", ".join(f"{k} {v:.2f} s" for k, v in m["timings"]["sampling_seconds"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ptqd report: {_e(m['model'])}</title>
<style>{CSS}</style></head><body>
<h1>ptqd report: {_e(m['model'])}</h1>
<div class="headline"><b>Quality:</b> {_e(h['quality'])}<br><b>Compute:</b> {_e(h['bops'])}<br>
<b>Size:</b> {_e(h['size'])}</div>
<h2>Configuration</h2>
<p>Model {_e(m['model'])} (sha256 {_e(m['model_sha256'][:12])}), {m['num_inference_steps']} DDIM steps,
eta {m['eta']:g}; schedule {_e(m['bops']['policy'])}: {_e(counts)}.
Evaluated on {m['samples']} samples, seeds ({m['seed']}, 0..{m['samples'] - 1}), the same for every variant.</p>
<h2>Quality per variant</h2>
<p class="note">Distribution metric: {_e(m['distribution_metric'])}; a Fréchet distance from
{m['samples']} samples is biased upward by the small sample, so compare the variants with each other, not with
figures from another sample count. MSE and PSNR compare each sample with the FP32 sample of the same seed.
"+ptqd" = with PTQD's correction; "mixed" = the calibrated schedule. images/s is wall time including each
variant's first (warm-up) calls.</p>
{_variants(m)}
{_img(images, 'samples', 'sample grids: FP32, mixed naive, mixed PTQD, same seeds')}
<h2>Per step</h2>
{_img(images, 'schedule', 'precision schedule over steps')}
{_img(images, 'noise_statistics', 'k, bias and sigma_q per step')}
{_img(images, 'snr', 'SNR before and after correction')}
{_img(images, 'step_error', 'latent error to FP32 per step')}
{_steps(m)}
<h2>Per-layer sensitivity</h2>
{_sensitivity(m)}
<h2>Cost</h2>
{_costs(m)}
<h2>What ran where</h2>
<ul><li>Report sampling: {_e(m['engines']['report_sampling'])}; {_e(timing)}.</li>
<li>TensorRT engines: {_e(m['engines']['tensorrt'])}.</li>
<li>Triton repository: {_e(m['triton'])}.</li>
<li>Calibration took {m['timings']['calibration_seconds']} s; this report {m['timings'].get('report_seconds', '—')} s.</li>
<li>4-bit integer activations (w4a4 and any w*a4 configuration) are an accuracy study, not a speed-up: no
runtime ptqd deploys to has 4-bit integer activation kernels (TensorRT's INT4 is weight-only: w4a16; ONNX
Runtime's QLinear kernels are 8-bit). The 4-bit activations a GPU runs are nvfp4's, on Blackwell.</li></ul>
</body></html>
"""
