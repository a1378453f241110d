"""How far the FP16 TensorRT graphs are from the FP32 reference graphs, in onnxruntime (CPU).

    .venv/bin/python benchmarks/fp16_graph.py OUT [--cfg w4a8] [--trajectories 16] [--num 256]

OUT is an export-trt output of the built-in model (e.g. `export-trt --bits 4 --steps 50`).
1. Held-out inputs: full-precision DDIM trajectories (the FP32 graph, the export's step count,
   eta 0) of sample indices 0..trajectories-1 of seed 7, never used by calibration (which draws
   indices >= 1,000,000). At every (x_t, t) the FP16 graph unet_<cfg>.onnx and the FP32
   reference graph unet_<cfg>.ort.onnx give eps; their difference is put beside the
   quantization error (reference vs the FP32 model). The same with the timestep path kept FP32
   measures whether that exception (exporter/fp16.py) matters.
2. Images: --num samples (seeds 0..num-1) through the export's folded schedule, eta 0, with
   the FP16 graphs and with the FP32 reference graphs as engines: per-sample MSE to the
   reference's image of the same seed, and the Fréchet distance to the real digits in the
   shipped classifier's features (as benchmarks/quality_table.py computes them).
3. What onnxruntime runs in FP16: per op type of the FP16 graph, how many nodes run on FP16
   tensors in the session's optimized graph and how many it wraps in Casts to FP32.
Prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from ptqd.ddim import build_schedule
from ptqd.evaluation.metrics import DigitFeatures, frechet_distance, per_sample_error, real_digit_features
from ptqd.exporter.cleanup import fold_and_clean
from ptqd.exporter.fp16 import convert_to_fp16, input_path
from ptqd.exporter.qdq import TENSORRT, insert_qdq
from ptqd.model import load_scheduler_config, resolve_model
from ptqd.runtime.noise import SampleNoise
from ptqd.runtime.onnxruntime import OnnxRuntimeUNet, create_session
from ptqd.runtime.sampler import Sampler
from ptqd.runtime.schedule import FoldedSchedule, apply_step

HELD_OUT_SEED = 7
BATCH = 64


def engine(path: Path) -> OnnxRuntimeUNet:
    # float kernels: the graph as written (DQ -> float op), as the reference is run against fake-quant
    return OnnxRuntimeUNet(path, float_kernels=True)


def timestep_fp32_graph(out: Path, cfg: str, path: Path) -> Path:
    """The TensorRT graph of `cfg` rebuilt as the exporter builds it, but with the timestep's
    path (broadcast, sinusoid) kept FP32."""
    from ptqd.calibration.params import load_params

    qdq = insert_qdq(onnx.load(str(out / "onnx" / "unet_fp32.onnx")), load_params(out / "calibration")[cfg],
                     TENSORRT)
    folded, _, _ = fold_and_clean(qdq)
    keep = {n: "measured" for n in input_path(folded, "timestep")}
    onnx.save(convert_to_fp16(folded, keep), str(path))
    return path


def held_out_inputs(out: Path, trajectories: int, steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x_t, t) at every step of FP32 DDIM trajectories, eta 0 (steps: the export's by default;
    the trajectories do not depend on the calibration)."""
    doc = json.loads((out / "calibration" / "ptqd.json").read_text())
    shape = FoldedSchedule.load(out / "scheduler").sample_shape
    steps = steps or doc["num_inference_steps"]
    sched = build_schedule(load_scheduler_config(resolve_model(doc["model"])), steps, 0.0, shape, ["fp32"] * steps)
    fp = engine(out / "onnx" / "unet_fp32.onnx")
    x = SampleNoise(HELD_OUT_SEED, 0, trajectories, tuple(shape)).initial()
    xs, ts = [], []
    for step in sched.steps:
        t = np.full(trajectories, float(step.timestep), np.float32)
        xs.append(x)
        ts.append(t)
        x = apply_step(sched, step, x, fp(x, t), None)
    return np.concatenate(xs), np.concatenate(ts)


def eps_of(graph: OnnxRuntimeUNet, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.concatenate([graph(x[i:i + BATCH], t[i:i + BATCH]) for i in range(0, len(x), BATCH)])


def eps_table(out: Path, cfg: str, variants: dict[str, Path], x: np.ndarray, t: np.ndarray,
              trajectories: int) -> list[str]:
    fp = eps_of(engine(out / "onnx" / "unet_fp32.onnx"), x, t)
    ref = eps_of(engine(out / "onnx" / f"unet_{cfg}.ort.onnx"), x, t)
    quant = np.abs(ref - fp)
    rows = [f"\n{len(x)} held-out inputs ({trajectories} trajectories × {len(x) // trajectories} steps, "
            f"seed {HELD_OUT_SEED}), eps of {cfg}:\n",
            "| graph | mean abs diff to FP32 reference | max abs diff | mean / quantization error's mean "
            "| max / quantization error's max |", "|---|---|---|---|---|",
            f"| quantization error: reference vs FP32 model | {quant.mean():.3e} | {quant.max():.3e} | 1 | 1 |"]
    for name, path in variants.items():
        d = np.abs(eps_of(engine(path), x, t) - ref)
        rows.append(f"| {name} | {d.mean():.3e} | {d.max():.3e} | {d.mean() / quant.mean():.3f} "
                    f"| {d.max() / quant.max():.3f} |")
    return rows


def fp32_schedule(out: Path) -> FoldedSchedule:
    """Plain DDIM at the export's steps and eta, every step on the FP32 graph."""
    doc = json.loads((out / "calibration" / "ptqd.json").read_text())
    shape, steps = FoldedSchedule.load(out / "scheduler").sample_shape, doc["num_inference_steps"]
    return build_schedule(load_scheduler_config(resolve_model(doc["model"])), steps, doc["eta"], shape,
                          ["fp32"] * steps)


def images_table(out: Path, variants: dict[str, dict[str, Path]], num: int) -> list[str]:
    schedule = FoldedSchedule.load(out / "scheduler")
    features = DigitFeatures(resolve_model("digits").extras_dir)
    real = real_digit_features(features)
    images, seconds = {}, {}
    for name, graphs in variants.items():
        t0 = time.perf_counter()
        sched = fp32_schedule(out) if set(graphs) == {"fp32"} else schedule
        sampler = Sampler(sched, {c: engine(p) for c, p in graphs.items()}, batch_size=BATCH)
        images[name] = sampler.generate(num, seed=0)
        seconds[name] = time.perf_counter() - t0
    ref = images["FP32 reference graphs (.ort.onnx)"]
    runs = ", ".join(f"{c}×{sum(s.config == c for s in schedule.steps)}" for c in schedule.configs)
    rows = [f"\n{num} images (seeds 0..{num - 1}), the export's folded schedule ({len(schedule.steps)} steps: "
            f"{runs}), eta {schedule.eta:g}:\n",
            "| engines | per-sample MSE to the reference's image | PSNR (dB) | Fréchet dist. to real digits "
            "| sampling time (s) |", "|---|---|---|---|---|"]
    for name, imgs in images.items():
        err = per_sample_error(imgs, ref)
        rows.append(f"| {name} | {err['mse']:.3e} | {err['psnr_db']:.2f} | "
                    f"{frechet_distance(features(imgs), real):.3f} | {seconds[name]:.0f} |")
    return rows


def range_table(path: Path, x: np.ndarray, t: np.ndarray) -> list[str]:
    """FP16 headroom where it is thinnest: the inputs of normalizations and softmaxes in the
    FP32 reference graph, and each normalization group's sum of squares (what an FP16
    accumulator of the variance would hold; FP16's largest value is 65504)."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    watched = {n.input[0]: n.op_type for n in model.graph.node if n.op_type in ("InstanceNormalization", "Softmax")}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in watched)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    absmax, sumsq = Counter(), Counter()
    for i in range(0, len(x), BATCH):
        outs = sess.run(list(watched), {"sample": x[i:i + BATCH], "timestep": t[i:i + BATCH]})
        for name, value in zip(watched, outs):
            op = watched[name]
            absmax[op] = max(absmax[op], float(np.abs(value).max()))
            if op == "InstanceNormalization":  # [N, groups, elements]: one variance per row
                sumsq[op] = max(sumsq[op], float((value.astype(np.float64) ** 2).sum(-1).max()))
    rows = [f"\nFP16 headroom in {path.name} on the held-out inputs (FP16 max 65504):\n",
            "| op | largest abs input | largest sum of squares per group |", "|---|---|---|"]
    rows += [f"| {op} | {absmax[op]:.3g} | {sumsq[op]:.3g} |" if op in sumsq else f"| {op} | {absmax[op]:.3g} | - |"
             for op in sorted(absmax)]
    return rows


def ort_precision_table(path: Path) -> list[str]:
    """Per op type: nodes onnxruntime runs on FP16 tensors vs nodes it computes in FP32."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        create_session(path, providers=["CPUExecutionProvider"], optimized_path=optimized, float_kernels=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(optimized)))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    fp16, fp32 = Counter(), Counter()
    for node in g.node:
        kinds = {types.get(n) for n in (*node.input, *node.output) if n}
        if node.op_type == "Cast" or not kinds & {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}:
            continue
        (fp32 if onnx.TensorProto.FLOAT in kinds else fp16)[node.op_type] += 1
    casts = sum(n.op_type == "Cast" for n in g.node)
    rows = [f"\nonnxruntime (CPU) on {path.name}: its optimized graph has {casts} Cast nodes\n",
            "| op | nodes on FP16 tensors | nodes computed in FP32 (behind inserted Casts) |", "|---|---|---|"]
    rows += [f"| {op} | {fp16[op]} | {fp32[op]} |" for op in sorted(set(fp16) | set(fp32))]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--cfg", default="w4a8")
    ap.add_argument("--trajectories", type=int, default=16)
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps of the held-out trajectories "
                    "[default: the export's]")
    args = ap.parse_args()
    out, onnx_dir = args.out, args.out / "onnx"
    configs = FoldedSchedule.load(out / "scheduler").configs
    x, t = held_out_inputs(out, args.trajectories, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        kept = {c: timestep_fp32_graph(out, c, Path(tmp) / f"unet_{c}.t32.onnx") for c in configs}
        rows = eps_table(out, args.cfg, {"FP16 graph (unet_<cfg>.onnx)": onnx_dir / f"unet_{args.cfg}.onnx",
                                         "FP16, timestep path FP32": kept[args.cfg]}, x, t, args.trajectories)
        rows += images_table(out, {
            "FP32 reference graphs (.ort.onnx)": {c: onnx_dir / f"unet_{c}.ort.onnx" for c in configs},
            "FP16 graphs (unet_<cfg>.onnx)": {c: onnx_dir / f"unet_{c}.onnx" for c in configs},
            "FP16, timestep path FP32": kept,
            "FP32 model (unet_fp32.onnx), plain DDIM": {"fp32": onnx_dir / "unet_fp32.onnx"}}, args.num)
    rows += range_table(onnx_dir / f"unet_{args.cfg}.ort.onnx", x, t)
    rows += ort_precision_table(onnx_dir / f"unet_{args.cfg}.onnx")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
