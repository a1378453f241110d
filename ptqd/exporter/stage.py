"""The export stage: OUT/calibration + the model -> OUT/onnx (the denoiser's FP and QDQ graphs,
precision plan; for latent and text models the VAE decoder and text encoders in float) and
OUT/scheduler (the folded PTQD schedule; pipeline.json and the tokenizers for conditional
models)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import onnx

from ptqd.calibration.artifact import load_ptqd_json, steps_and_corrections
from ptqd.calibration.params import load_params
from ptqd.errors import UserError
from ptqd.exporter.cleanup import fold_and_clean
from ptqd.exporter.fp16 import convert_to_fp16, fp32_exceptions, tensorrt_exceptions
from ptqd.exporter.graph_io import save_graph
from ptqd.exporter.lint import lint_model
from ptqd.exporter.onnx_fp import export_fp_onnx, layer_nodes
from ptqd.exporter.precision_plan import precision_plan
from ptqd.exporter.qdq import ONNXRUNTIME, ONNXRUNTIME_FAST, TENSORRT, insert_qdq
from ptqd.memory import release_free_memory
from ptqd.ddim import build_schedule
from ptqd.runtime.layout import (DEFAULT_DENOISER, SPEC_FILE, TEXT_ENCODER_ROLE, VAE_DECODER_GRAPH, VAE_DECODER_ROLE,
                                 deployment, graph_files, graph_path)

# flavour -> (storage, whose lint rules apply); file names in layout.GRAPH_FILES
FLAVOURS = {
    "tensorrt": (TENSORRT, "tensorrt"),
    "onnxruntime": (ONNXRUNTIME, "onnxruntime"),
    "cpu-fast": (ONNXRUNTIME_FAST, "onnxruntime"),
}
PLAN_FILE = "precision_plan.json"


def _save_checked(model: onnx.ModelProto, path: Path, target: str) -> None:
    save_graph(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    violations = lint_model(model, target)
    if violations:  # the exporter's own output breaking the rules is a bug, not a user error
        raise RuntimeError(f"{path.name} fails the {target} lint: " + "; ".join(map(str, violations[:3])))


def tensorrt_graph(qdq: list[onnx.ModelProto], name: str) -> onnx.ModelProto:
    """What TensorRT builds: the QDQ graph folded and cleaned, then FP16 inside (float32 I/O)
    but for the FP32 exceptions fp16.tensorrt_exceptions names. `qdq` is handed over in a list
    that is emptied: each step's input is freed once its output exists, so at most two copies
    of the graph are alive (an SDXL UNet's QDQ graph is gigabytes)."""
    folded, before, after = fold_and_clean(qdq.pop())
    exceptions = tensorrt_exceptions(folded)
    click.echo(f"[export] {name}: folded {before} -> {after}; FP16, "
               f"{len(exceptions)} node(s) kept FP32")
    return convert_to_fp16(folded, exceptions)


def calibrated_spec(model, doc: dict):
    """The PipelineSpec at the guidance scale and conditions the calibration used."""
    from ptqd.conditions import pipeline_spec

    cond = doc.get("conditioning") or {}
    scale = cond.get("guidance_scale") if cond.get("kind", "unconditional") != "unconditional" else None
    return pipeline_spec(model, scale, tuple(cond.get("calibration_conditions", ())))


def fp16_copy(fp32: Path, path: Path) -> Path:
    """The FP16 copy TensorRT builds of a float graph (a CLIP text encoder): folded, every
    float tensor FP16 inside, float32 at its inputs and outputs; checked and linted."""
    folded, _, _ = fold_and_clean(onnx.load(str(fp32)))
    _save_checked(convert_to_fp16(folded), path, "tensorrt")
    return path


def export_pipeline_graphs(model, spec, onnx_dir: Path) -> list[Path]:
    """Float graphs of what runs around the denoiser, as the deployment lists them: each text
    encoder and the VAE decoder in FP32 (ONNX Runtime's), and the VAE decoder's FP16 copy for
    TensorRT (traced from a half copy of the VAE; the text encoders' FP16 copies are converted
    from their graphs later, text_encoder_fp16_copies, once the torch modules are gone)."""
    from ptqd.conditions import latent_shape, text_encoder_modules
    from ptqd.exporter.pipeline_graphs import export_text_encoder, export_vae_decoder

    written = []
    modules = text_encoder_modules(model)
    encoders = {e["name"]: e for e in spec.text_encoders}
    for graph in deployment(spec, latent_shape(model.denoiser), []):
        if graph.role == TEXT_ENCODER_ROLE:
            written.append(export_text_encoder(modules[graph.name], onnx_dir / graph.cpu_graph,
                                               encoders[graph.name]["max_length"]))
        elif graph.role == VAE_DECODER_ROLE:
            shape = tuple(latent_shape(model.denoiser))
            written.append(export_vae_decoder(model.vae, onnx_dir / VAE_DECODER_GRAPH, shape))
            # the copy TensorRT builds (FP32 stays for ONNX Runtime, whose CPU kernels are FP32)
            written.append(export_vae_decoder(model.vae, onnx_dir / graph.tensorrt_graph, shape, half=True))
    return written


def text_encoder_fp16_copies(spec, onnx_dir: Path) -> list[Path]:
    """The FP16 copies TensorRT builds of the text encoders the deployment builds in FP16."""
    return [fp16_copy(onnx_dir / g.cpu_graph, onnx_dir / g.tensorrt_graph) for g in deployment(spec, [], [])
            if g.role == TEXT_ENCODER_ROLE and g.tensorrt_graph != g.cpu_graph]


def export_graphs(model, calibration_dir: Path, onnx_dir: Path) -> list[Path]:
    from ptqd.conditions import example_conditioning

    doc = load_ptqd_json(calibration_dir)
    if doc["model_sha256"] != model.source.sha256:
        raise UserError(f"{calibration_dir} was calibrated for another model (sha256 differs); "
                        "recalibrate or pass the model it was made from")
    params = load_params(calibration_dir)
    spec = calibrated_spec(model, doc)
    denoiser = spec.denoiser
    onnx_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # one module's weights in memory at a time beside its ONNX export (an SDXL UNet's are
    # 10 GB in FP32): the text encoders and VAE first, then the denoiser, and what follows is
    # made from the graphs alone
    example = example_conditioning(model, spec, 2)
    pipeline_graphs = export_pipeline_graphs(model, spec, onnx_dir)
    model.release_modules(denoiser=False)
    fp_path = export_fp_onnx(model.denoiser, graph_path(onnx_dir, "fp32", "tensorrt", denoiser), example)
    written = [fp_path] + pipeline_graphs
    model.release_modules()
    written += text_encoder_fp16_copies(spec, onnx_dir)
    release_free_memory()
    fp_model = onnx.load(str(fp_path))
    exceptions = {}
    for cfg in sorted(params):
        for flavour, (storage, target) in FLAVOURS.items():
            path = graph_path(onnx_dir, cfg, flavour, denoiser)
            if path in written:  # a file two flavours share (layout.graph_path)
                continue
            if flavour == "tensorrt":   # handed over in a list: nothing here holds the QDQ graph
                graph = tensorrt_graph([insert_qdq(fp_model, params[cfg], storage)], path.name)
                exceptions[cfg] = fp32_exceptions(graph)
            else:
                graph = insert_qdq(fp_model, params[cfg], storage)
            _save_checked(graph, path, target)
            del graph
            release_free_memory()   # each flavour's memory, before the next is made
            written.append(path)
    plan = precision_plan(layer_nodes(fp_model), params, fp_model, model.family, denoiser, exceptions)
    (onnx_dir / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")
    for path in written:
        files = graph_files(path)
        size = sum(f.stat().st_size for f in files) / 1e6
        click.echo(f"[export] {onnx_dir.name}/{path.name} ({size:.2f} MB"
                   + (f", weights in {files[1].name})" if len(files) > 1 else ")"))
    click.echo(f"[export] {len(written)} graphs checked and linted in {time.perf_counter() - t0:.1f} s")
    return written


def export_scheduler(model, calibration_dir: Path, scheduler_dir: Path) -> Path:
    from ptqd.exporter.diffusers_scheduler import PTQDFoldedScheduler

    from ptqd.conditions import latent_shape

    doc = load_ptqd_json(calibration_dir)
    configs, corrections = steps_and_corrections(doc, "mixed", correction=True)
    schedule = build_schedule(model.scheduler_config, doc["num_inference_steps"], doc["eta"],
                              latent_shape(model.denoiser), configs, corrections)
    path = schedule.save(scheduler_dir)
    PTQDFoldedScheduler.from_schedule(schedule).save_pretrained(str(scheduler_dir))
    spec = calibrated_spec(model, doc)
    if spec.conditional or spec.latent or spec.denoiser != DEFAULT_DENOISER:
        spec.save(scheduler_dir)   # an unconditional pixel UNet needs none: every default holds
        click.echo(f"[export] {scheduler_dir.name}/{SPEC_FILE}: {spec.family}, {spec.kind}, guidance "
                   f"{spec.guidance_scale:g}" + (", VAE decoder" if spec.latent else ""))
    from ptqd.exporter.tokenizer_files import save_prompt_tokenizer

    for encoder in spec.text_encoders:
        save_prompt_tokenizer(model.tokenizers[encoder["tokenizer"]], scheduler_dir / encoder["tokenizer"],
                              encoder["max_length"])
    scheduler = model.scheduler_config.get("_class_name", "DDIMScheduler")
    if scheduler != "DDIMScheduler":
        click.echo(f"[export] the model's scheduler is {scheduler}: ptqd runs DDIM from its config (the folded "
                   "PTQD schedule is DDIM's update)")
    runs = ", ".join(f"{c}×{configs.count(c)}" for c in sorted(set(configs)))
    click.echo(f"[export] {scheduler_dir.name}/{path.name}: {len(configs)} steps ({runs})")
    return path
