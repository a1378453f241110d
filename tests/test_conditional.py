"""Conditional latent diffusion through every stage, on tiny random-weight pipelines built in
code (no weights can be downloaded here): a text-conditioned Stable Diffusion layout (CLIP
text encoder, UNet2DConditionModel, VAE) and a class-conditional latent UNet with a VAE.
Random weights make the images meaningless; these tests check the mechanics: interfaces,
guidance, where the PTQD statistics come from, and that every backend computes the same thing.
"""
import json
import subprocess

import numpy as np
import onnx
import pytest
import torch

from ptqd.calibration.fakequant import fake_quant_unet
from ptqd.calibration.trajectory import TorchUNetEngine
from ptqd.calibration.params import load_params
from ptqd.runtime.conditioning import Guided, PipelineSpec, runtime_conditioner
from ptqd.runtime.onnxruntime import OnnxRuntimeGraph, OnnxRuntimeUNet
from ptqd.runtime.layout import graph_path
from tests.conftest import CONDITIONAL_STEPS, GUIDANCE, assert_user_error, run_cli


def _inputs(path):
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: (i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
            for i in model.graph.input}


def _runtime_conditioner(out, conditions=()):
    spec = PipelineSpec.load(out / "scheduler")
    encoders = {e["name"]: OnnxRuntimeGraph(out / "onnx" / f"{e['name']}.onnx") for e in spec.text_encoders}
    return spec, runtime_conditioner(spec, conditions, out / "scheduler", encoders)


def test_text_export_writes_conditioned_unet_graphs_decoder_encoder_and_scheduler(tiny_text_export):
    out = tiny_text_export
    spec = PipelineSpec.load(out / "scheduler")
    assert (spec.kind, spec.guidance_scale, spec.latent, spec.image_shape) == ("text", GUIDANCE, True, [3, 16, 16])
    float_, int64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    expected = {"sample": (float_, ["batch", 4, 8, 8]), "timestep": (float_, ["batch"]),
                "encoder_hidden_states": (float_, ["batch", 16, 32])}
    for graph in ["unet_fp32.onnx", *(p.name for p in (out / "onnx").glob("unet_w*.onnx"))]:
        assert _inputs(out / "onnx" / graph) == expected, graph
    assert _inputs(out / "onnx" / "vae_decoder.onnx") == {"latents": (float_, ["batch", 4, 8, 8])}
    assert _inputs(out / "onnx" / "text_encoder.onnx") == {"input_ids": (int64, ["batch", 16])}
    schedule = json.loads((out / "scheduler" / "ptqd_schedule.json").read_text())
    assert len(schedule["steps"]) == CONDITIONAL_STEPS and schedule["sample_shape"] == [4, 8, 8]
    doc = json.loads((out / "calibration" / "ptqd.json").read_text())
    assert doc["conditioning"]["kind"] == "text" and doc["conditioning"]["guidance_scale"] == GUIDANCE
    # the build script builds every UNet with its conditioning input, and the decoder and encoder
    script = (out / "engines" / "build_engines.sh").read_text()
    for cfg in {s["config"] for s in schedule["steps"]}:
        assert f"--saveEngine=engines/unet_{cfg}.plan" in script
    assert "--minShapes=sample:1x4x8x8,timestep:1,encoder_hidden_states:1x16x32" in script
    # ... the decoder from its FP16 copy (strongly typed: the graph's precision is the engine's)
    assert "--onnx=onnx/vae_decoder.fp16.onnx" in script and "--maxShapes=latents:8x4x8x8" in script
    assert "--onnx=onnx/text_encoder.fp16.onnx" in script and "--maxShapes=input_ids:8x16" in script
    assert _inputs(out / "onnx" / "vae_decoder.fp16.onnx") == _inputs(out / "onnx" / "vae_decoder.onnx")
    weights = onnx.load(str(out / "onnx" / "vae_decoder.fp16.onnx")).graph.initializer
    assert {w.data_type for w in weights if len(w.dims) > 1} == {onnx.TensorProto.FLOAT16}
    assert subprocess.run(["bash", "-n", str(out / "engines" / "build_engines.sh")]).returncode == 0
    # the precision plan covers the attention projections, cross-attention to_k/to_v included
    plan = json.loads((out / "onnx" / "precision_plan.json").read_text())["configs"]["w4a8"]["layers"]
    cross = [e for e in plan if e["layer"].endswith("attn2.to_k") or e["layer"].endswith("attn2.to_v")]
    assert cross and all(e["requested"] == "w4a8" and e["role"].startswith("cross-attention") for e in cross)
    result = run_cli("verify", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "report.html" in (out.parent / "export-trt.log").read_text()


def test_guided_onnxruntime_matches_torch_fake_quant(tiny_text_export):
    """One guided UNet evaluation per configuration: the ONNX Runtime reference graph (fake
    quant's exact twin) against the torch fake-quant UNet, both behind the same Guided wrapper
    and the same prompts. Float summation order flips a few roundings, which cascade through
    later layers (measured: 0.0098 mean against a 0.092 quantization effect for w4a8), so the
    whole UNet is held to a quarter of the effect, and each cross-attention projection (the
    layers that quantize the text encoder's states) alone, where nothing can cascade, to 2e-3."""
    from ptqd.calibration.params import ConfigQuant
    from ptqd.exporter.qdq import ONNXRUNTIME, insert_qdq
    from ptqd.model import load_model

    out = tiny_text_export
    doc = json.loads((out / "calibration" / "ptqd.json").read_text())
    model = load_model(doc["model"], CONDITIONAL_STEPS)
    spec, conditioner = _runtime_conditioner(out, ["a red cube", "a blue sphere", "", "a long " * 30])
    cond, uncond = conditioner.chunk_inputs(0, 4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=gen).numpy()
    t = np.array([961.0, 701.0, 301.0, 21.0], dtype=np.float32)
    fp = Guided(TorchUNetEngine(model.denoiser), cond, uncond, spec.guidance_scale)(x, t)
    for cfg, quant in load_params(out / "calibration").items():
        torch_q = Guided(TorchUNetEngine(fake_quant_unet(model.denoiser, quant)), cond, uncond, spec.guidance_scale)(x, t)
        onnx_q = Guided(OnnxRuntimeUNet(graph_path(out / "onnx", cfg, "onnxruntime"), float_kernels=True), cond, uncond,
                        spec.guidance_scale)(x, t)
        quant_effect = np.abs(torch_q - fp).mean()
        assert quant_effect > 1e-4, cfg
        assert np.abs(onnx_q - torch_q).mean() < 0.25 * quant_effect, cfg
    quant = load_params(out / "calibration")["w4a8"]
    fp_graph = onnx.load(str(out / "onnx" / "unet_fp32.onnx"))
    cross = [name for name in quant.layers if ".attn2.to_" in name]
    assert len(cross) >= 3
    for layer in cross:
        single = ConfigQuant(quant.config, {layer: quant.layers[layer]})
        expected = TorchUNetEngine(fake_quant_unet(model.denoiser, single))(x, t, **cond)
        graph = insert_qdq(fp_graph, single, ONNXRUNTIME)
        path = out.parent / "single.onnx"
        onnx.save(graph, str(path))
        assert np.abs(OnnxRuntimeUNet(path)(x, t, **cond) - expected).max() < 2e-3, layer


def test_ptqd_statistics_are_measured_on_the_guided_prediction(tiny_text_export):
    """Re-run calibration's trajectory with the exported graphs only (ONNX Runtime text
    encoder, FP32 and W4A8 UNets behind Guided): k, bias and sigma_q match ptqd.json. The
    unguided prediction's statistics do not, so the match says which one calibration used."""
    from ptqd.calibration.data import CALIBRATION_INDEX_OFFSET
    from ptqd.calibration.noise_stats import step_stats
    from ptqd.runtime.noise import SampleNoise
    from ptqd.runtime.schedule import apply_step
    from ptqd.ddim import build_schedule
    from ptqd.model import load_scheduler_config, resolve_model

    out = tiny_text_export
    doc = json.loads((out / "calibration" / "ptqd.json").read_text())
    n, n_fit, steps = doc["calib_samples"], doc["calib_samples"] * 3 // 4, doc["num_inference_steps"]
    spec, conditioner = _runtime_conditioner(out, doc["conditioning"]["calibration_conditions"])
    cond, uncond = conditioner.chunk_inputs(0, n)
    # the FP32 reference graph (fake-quant's twin): unet_w4a8.onnx is TensorRT's FP16 graph now
    fp_graph = OnnxRuntimeUNet(out / "onnx" / "unet_fp32.onnx")
    q_graph = OnnxRuntimeUNet(out / "onnx" / "unet_w4a8.ort.onnx", float_kernels=True)
    guided = {s: (Guided(fp_graph, cond, uncond, s), Guided(q_graph, cond, uncond, s)) for s in (GUIDANCE, 1.0)}
    fp_sched = build_schedule(load_scheduler_config(resolve_model(doc["model"])), steps, doc["eta"], [4, 8, 8],
                              ["fp32"] * steps)
    x = SampleNoise(doc["seed"], CALIBRATION_INDEX_OFFSET, n, (4, 8, 8)).initial()
    unguided_off = []
    for step, ref in zip(fp_sched.steps, doc["stats"]["w4a8"]):
        t = np.full(n, float(step.timestep), np.float32)
        stats = {}
        for scale, (fp, q) in guided.items():
            eps, eps_q = fp(x, t), q(x, t)
            e, d = torch.from_numpy(eps), torch.from_numpy(eps_q - eps)
            stats[scale] = step_stats(e[:n_fit], d[:n_fit], e[n_fit:], d[n_fit:], mode=ref["correction"])
            if scale == GUIDANCE:
                next_x = apply_step(fp_sched, step, x, eps, None)
        # measured: bias within 2.7e-3, sigma_q within 1.2 % (rounding flips between torch and
        # onnxruntime); the unguided prediction's sigma_q is 9-55 % off at every step
        assert stats[GUIDANCE].k == pytest.approx(ref["k"], abs=0.01)
        assert stats[GUIDANCE].bias == pytest.approx(ref["bias"], abs=4e-3)
        assert stats[GUIDANCE].sigma_q == pytest.approx(ref["sigma_q"], rel=0.03)
        unguided_off.append(abs(stats[1.0].sigma_q - ref["sigma_q"]) / ref["sigma_q"])
        x = next_x
    assert min(unguided_off) > 0.03  # at every step, outside the tolerance the guided one meets


def test_text_sampling_backends_agree_and_prompts_condition_the_images(tiny_text_export, tmp_path):
    """`ptqd sample OUT` with prompts: torch fake-quant vs ONNX Runtime reference graphs vs
    full precision, same seed; the images follow the prompts and not the batch size."""
    out = tiny_text_export
    runs = {"torch": ["--backend", "torch"], "reference": ["--backend", "onnxruntime", "--graph", "reference"],
            "fp": ["--backend", "torch", "--precision", "fp32"],
            "other": ["--backend", "onnxruntime", "--graph", "reference", "--prompt", "a green tree"],
            "batch1": ["--backend", "onnxruntime", "--graph", "reference", "--batch-size", "1"]}
    images = {}
    for name, args in runs.items():
        path = tmp_path / f"{name}.npy"
        prompts = [] if "--prompt" in args else ["--prompt", "a red cube", "--prompt", "a blue sphere"]
        r = run_cli("sample", str(out), *args, *prompts, "--num", "4", "--seed", "3", "--output", str(path))
        assert r.returncode == 0, r.stderr
        images[name] = np.load(path)
    assert images["torch"].shape == (4, 3, 16, 16)
    assert np.abs(images["torch"] - images["reference"]).mean() < np.abs(images["torch"] - images["fp"]).mean()
    np.testing.assert_array_equal(images["batch1"], images["reference"])
    assert np.abs(images["other"] - images["reference"]).mean() > 1e-3


def test_class_conditional_latent_model_exports_and_samples(tiny_class_export, tmp_path):
    out = tiny_class_export
    spec = PipelineSpec.load(out / "scheduler")
    assert (spec.kind, spec.num_classes, spec.null_class, spec.default_conditions) == ("class", 10, 10, [1, 2, 3])
    inputs = _inputs(out / "onnx" / "unet_w4a8.onnx")
    assert inputs["class_labels"] == (onnx.TensorProto.INT64, ["batch"])
    assert not (out / "onnx" / "text_encoder.onnx").exists() and (out / "onnx" / "vae_decoder.onnx").is_file()
    files = {}
    for name, label in (("a", "4"), ("b", "5")):
        files[name] = tmp_path / f"{name}.npy"
        r = run_cli("sample", str(out), "--backend", "onnxruntime", "--class", label, "--num", "2", "--output",
                    str(files[name]))
        assert r.returncode == 0, r.stderr
    a, b = np.load(files["a"]), np.load(files["b"])
    assert a.shape == (2, 3, 16, 16) and np.abs(a - b).mean() > 1e-3
    assert_user_error(run_cli("sample", str(out), "--class", "10", "--output", str(tmp_path / "x.npy")),
                      "0..9")
    assert_user_error(run_cli("sample", str(out), "--prompt", "a cat", "--output", str(tmp_path / "x.npy")),
                      "class labels must be integers")


def test_conditioning_options_on_the_wrong_model_are_one_line_and_write_nothing(tmp_path, tiny_class_export):
    target = tmp_path / "o"
    assert_user_error(run_cli("--guidance-scale", "3", "--output", str(target), entry="export-trt"),
                      "unconditional")
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    assert_user_error(run_cli("--prompts", str(empty), "--output", str(target), entry="export-trt"), "no prompts")
    doc = json.loads((tiny_class_export / "calibration" / "ptqd.json").read_text())
    assert_user_error(run_cli("--model", doc["model"], "--prompts", __file__, "--output", str(target),
                              entry="export-trt"), "class labels must be integers")
    assert_user_error(run_cli("--model", doc["model"], "--guidance-scale", "0.5", "--output", str(target),
                              entry="export-trt"), "at least 1")
    assert not target.exists()


def test_verify_names_a_pipeline_json_that_disagrees_with_calibration(tiny_class_export, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_class_export, out)
    spec_path = out / "scheduler" / "pipeline.json"
    doc = json.loads(spec_path.read_text())
    doc["guidance_scale"] = 5.0
    spec_path.write_text(json.dumps(doc))
    result = run_cli("verify", str(out))
    assert result.returncode != 0
    assert "guidance scale 5.0 differs" in result.stdout + result.stderr


def test_a_guided_model_is_not_deployed_on_engines_that_take_one_sample(tiny_class_export, tmp_path):
    """Guidance needs two UNet samples per image: a batch profile of 1 would fail every request."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_class_export, out)
    result = run_cli("build", str(out), "--batch", "1,1,1", "--force")
    assert result.returncode == 0, result.stderr
    before = sorted(p.name for p in (out / "triton").iterdir())
    assert_user_error(run_cli("deploy", str(out), "--force"), "cannot take one guided image")
    assert sorted(p.name for p in (out / "triton").iterdir()) == before
