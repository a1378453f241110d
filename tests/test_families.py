"""Model families through every stage (ptqd.families): SDXL's UNet with two text encoders, DiT
and PixArt-alpha, each a tiny random-weight pipeline saved by diffusers' own pipeline class.

The standard for a family: its full-precision samples through ptqd's exported ONNX Runtime
engines equal diffusers' own pipeline (DDIM from the folder's scheduler config, eta 0, the
same x_T, the same guidance scale and conditions) to float rounding. Random weights make the
images meaningless; what is checked is that ptqd computes what diffusers computes, and that
the quantized and deployed paths run.
"""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ptqd.runtime.conditioning import PipelineSpec
from ptqd.runtime.noise import SampleNoise
from tests.conftest import FAMILY_STEPS, GUIDANCE, CONDITIONAL_STEPS, assert_user_error, run_cli

PROMPTS = ["a red cube", "a blue sphere in the city"]
CLASSES = [3, 500]
# DiT's latents are drawn inside DiTPipeline (it takes no `latents`): its module's randn_tensor
# hands it ptqd's x_T
DIT_NOISE = "diffusers.pipelines.dit.pipeline_dit.randn_tensor"


def _inputs(path):
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def _outputs(path):
    model = onnx.load(str(path), load_external_data=False)
    return {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}


def _ptqd_images(out, tmp_path, *args):
    path = tmp_path / "ptqd.npy"
    result = run_cli("sample", str(out), "--backend", "onnxruntime", "--seed", "0", "--output", str(path), "--force",
                     *args)
    assert result.returncode == 0, result.stderr
    return np.load(path)


def _diffusers_images(out, monkeypatch, num: int, conditions: list, **call):
    """diffusers' pipeline on the folder OUT was made from, DDIM from its scheduler config,
    x_T = ptqd's noise for images 0..num-1 of seed 0; images as NCHW in [0, 1]."""
    import diffusers
    from diffusers import DDIMScheduler

    doc = json.loads((out / "calibration" / "ptqd.json").read_text())
    spec = PipelineSpec.load(out / "scheduler")
    index = json.loads((Path(doc["model"]) / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(doc["model"])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    shape = json.loads((out / "scheduler" / "ptqd_schedule.json").read_text())["sample_shape"]
    x = torch.from_numpy(SampleNoise(0, 0, num, tuple(shape)).initial())
    args = dict(guidance_scale=spec.guidance_scale, num_inference_steps=doc["num_inference_steps"],
                output_type="np", **call)
    with torch.no_grad():
        if spec.family == "dit":
            monkeypatch.setattr(DIT_NOISE, lambda *a, **k: x)
            images = pipe(class_labels=conditions, **args).images
        else:
            images = pipe(conditions, latents=x, eta=0.0, **args).images
    return np.transpose(images, (0, 3, 1, 2))


def _condition_args(spec, conditions):
    if spec.kind == "class":
        return ["--class", ",".join(map(str, conditions))]
    return [a for p in conditions for a in ("--prompt", p)]


FAMILIES = {
    "sdxl": ("tiny_sdxl_export", PROMPTS, {}),
    "dit": ("tiny_dit_export", CLASSES, {}),
    # without bs4/ftfy PixArt lowercases and strips prompts, as ptqd does; no resolution binning
    # for a sample size the pipeline has no bins for
    "pixart": ("tiny_pixart_export", PROMPTS, {"clean_caption": False, "use_resolution_binning": False}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_precision_samples_equal_diffusers_pipeline(family, request, tmp_path, monkeypatch):
    """ptqd's FP32 graphs on ONNX Runtime (text encoders, denoiser with guidance, VAE decoder)
    against diffusers' pipeline: max |difference| of the images within 1e-3 (measured: 5e-7
    for SDXL and DiT, 2e-5 for PixArt)."""
    fixture, conditions, call = FAMILIES[family]
    out = request.getfixturevalue(fixture)
    spec = PipelineSpec.load(out / "scheduler")
    ours = _ptqd_images(out, tmp_path, "--precision", "fp32", "--num", "2", *_condition_args(spec, conditions))
    theirs = _diffusers_images(out, monkeypatch, 2, conditions, **call)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert np.abs(theirs - 0.5).mean() > 0.01   # not a blank image
    assert np.abs(ours - theirs).max() <= 1e-3


def test_sd_layout_samples_equal_diffusers_pipeline(tiny_text_export, tmp_path, monkeypatch):
    """The family ptqd had before the seam, held to the same standard."""
    ours = _ptqd_images(tiny_text_export, tmp_path, "--precision", "fp32", "--num", "2",
                        *_condition_args(PipelineSpec(kind="text"), PROMPTS))
    theirs = _diffusers_images(tiny_text_export, monkeypatch, 2, PROMPTS)
    assert np.abs(ours - theirs).max() <= 1e-3
    doc = json.loads((tiny_text_export / "calibration" / "ptqd.json").read_text())
    assert doc["num_inference_steps"] == CONDITIONAL_STEPS and doc["conditioning"]["guidance_scale"] == GUIDANCE


def _spec(out):
    return PipelineSpec.load(out / "scheduler")


def test_sdxl_unet_takes_demodiffusion_inputs_from_two_text_encoders(tiny_sdxl_export):
    out = tiny_sdxl_export
    spec = _spec(out)
    assert (spec.family, spec.kind, spec.denoiser, spec.zero_uncond) == ("sdxl-unet", "text", "unet", True)
    assert len(json.loads((out / "scheduler" / "ptqd_schedule.json").read_text())["steps"]) == FAMILY_STEPS
    # the names demoDiffusion and Model Optimizer give SDXL's UNet inputs; both encoders' 32-wide
    # penultimate states concatenated, the second's 32-wide pooled projection, 6 time ids
    for graph in ("unet_fp32.onnx", "unet_w4a8.onnx", "unet_w4a8.ort.onnx", "unet_w8a8.cpu.onnx"):
        assert _inputs(out / "onnx" / graph) == {
            "sample": ["batch", 4, 8, 8], "timestep": ["batch"], "encoder_hidden_states": ["batch", 16, 64],
            "text_embeds": ["batch", 32], "time_ids": ["batch", 6]}, graph
    assert _outputs(out / "onnx" / "text_encoder.onnx") == {"encoder_hidden_states": ["batch", 16, 32]}
    assert _outputs(out / "onnx" / "text_encoder_2.onnx") == {"encoder_hidden_states": ["batch", 16, 32],
                                                               "text_embeds": ["batch", 32]}
    # StableDiffusionXLPipeline's defaults: original = target = 16x16 pixels, crop at (0, 0)
    assert spec.constant_inputs == {"time_ids": [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]}
    for folder in ("tokenizer", "tokenizer_2"):
        assert (out / "scheduler" / folder / "tokenizer.json").is_file()
        assert (out / "triton" / "ptqd_sampler" / "1" / folder / "tokenizer.json").is_file()
    script = (out / "engines" / "build_engines.sh").read_text()
    # both CLIP encoders built in FP16 from their converted copies, checked against the FP32 graphs
    assert "--onnx=onnx/text_encoder_2.fp16.onnx" in script and "--saveEngine=engines/text_encoder_2.plan" in script
    assert "check_plan text_encoder_2 text_encoder_2.onnx" in script
    from ptqd.runtime.onnxruntime import OnnxRuntimeGraph

    ids = np.random.default_rng(0).integers(0, 300, size=(2, 16)).astype(np.int64)
    full, half = (OnnxRuntimeGraph(out / "onnx" / g).outputs(input_ids=ids)
                  for g in ("text_encoder_2.onnx", "text_encoder_2.fp16.onnx"))
    # measured on this tiny random CLIP: 1.4e-3 at most, on values of mean magnitude 0.3-0.9
    assert all(np.abs(full[k] - half[k]).max() < 5e-3 for k in full)
    assert ("--minShapes=sample:1x4x8x8,timestep:1,encoder_hidden_states:1x16x64,text_embeds:1x32,time_ids:1x6"
            in script)
    log = (out.parent / "export-trt.log").read_text()
    assert "EulerDiscreteScheduler: ptqd runs DDIM" in log
    plan = json.loads((out / "onnx" / "precision_plan.json").read_text())
    layers = {e["layer"]: e for e in plan["configs"]["w4a8"]["layers"]}
    assert layers["add_embedding.linear_1"]["requested"] == "fp32"
    assert layers["add_embedding.linear_1"]["role"].startswith("added-condition embedder")
    assert run_cli("verify", str(out)).returncode == 0


def test_dit_graphs_are_transformers_whose_output_is_eps(tiny_dit_export):
    out = tiny_dit_export
    names = sorted(p.name for p in (out / "onnx").glob("*.onnx"))
    assert "transformer_fp32.onnx" in names and not [n for n in names if n.startswith("unet")]
    for graph in ("transformer_fp32.onnx", "transformer_w4a8.onnx", "transformer_w4a8.ort.onnx"):
        assert _inputs(out / "onnx" / graph) == {"sample": ["batch", 4, 8, 8], "timestep": ["batch"],
                                                 "class_labels": ["batch"]}
        # eps only: the first 4 of the transformer's 8 output channels (learned variance dropped)
        assert _outputs(out / "onnx" / graph) == {"noise_pred": ["batch", 4, 8, 8]}
    spec = _spec(out)
    assert (spec.family, spec.denoiser, spec.num_classes, spec.null_class) == ("dit", "transformer", 1000, 1000)
    assert spec.default_conditions == [1, 2, 3, 500]
    plan = json.loads((out / "onnx" / "precision_plan.json").read_text())
    layers = {e["layer"]: e for e in plan["configs"]["w4a8"]["layers"]}
    kept = sorted(name for name, e in layers.items() if e["requested"] == "fp32")
    assert kept == ["pos_embed.proj", "proj_out_1", "proj_out_2",
                    *(f"transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{j}" for i in (0, 1) for j in (1, 2))]
    assert layers["transformer_blocks.0.norm1.linear"] == {**layers["transformer_blocks.0.norm1.linear"],
                                                           "requested": "w4a8", "role": "adaLN-Zero modulation"}
    assert layers["transformer_blocks.1.attn1.to_q"]["requested"] == "w4a8"
    assert layers["proj_out_2"]["role"] == "final layer (eps and variance)"
    script = (out / "engines" / "build_engines.sh").read_text()
    assert "--saveEngine=engines/transformer_" in script and "unet_" not in script
    assert run_cli("verify", str(out)).returncode == 0


def test_pixart_transformer_reads_t5_states_under_their_mask(tiny_pixart_export, tmp_path):
    out = tiny_pixart_export
    assert _inputs(out / "onnx" / "transformer_w4a8.onnx") == {
        "sample": ["batch", 4, 8, 8], "timestep": ["batch"], "encoder_hidden_states": ["batch", 120, 32],
        "encoder_attention_mask": ["batch", 120]}
    assert _inputs(out / "onnx" / "text_encoder.onnx") == {"input_ids": ["batch", 120],
                                                           "attention_mask": ["batch", 120]}
    # T5 stays FP32 for TensorRT too (its attention bias holds float32's lowest value)
    assert not (out / "onnx" / "text_encoder.fp16.onnx").exists()
    assert "--onnx=onnx/text_encoder.onnx" in (out / "engines" / "build_engines.sh").read_text()
    spec = _spec(out)
    assert (spec.family, spec.mask_input, spec.prompt_preparation) == ("pixart-alpha", "encoder_attention_mask",
                                                                       "lower-strip")
    # PixArtAlphaPipeline lowercases and strips a prompt (without bs4/ftfy to clean it)
    a = _ptqd_images(out, tmp_path, "--num", "1", "--prompt", "a red cube")
    b = _ptqd_images(out, tmp_path, "--num", "1", "--prompt", "  A Red CUBE ")
    c = _ptqd_images(out, tmp_path, "--num", "1", "--prompt", "a red tree")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-4
    assert run_cli("verify", str(out)).returncode == 0


@pytest.mark.parametrize("fixture", ["tiny_sdxl_export", "tiny_dit_export", "tiny_pixart_export"])
def test_quantized_sampling_runs_near_full_precision(fixture, request, tmp_path):
    out = request.getfixturevalue(fixture)
    spec = _spec(out)
    conditions = _condition_args(spec, CLASSES if spec.kind == "class" else PROMPTS)
    fp = _ptqd_images(out, tmp_path, "--precision", "fp32", "--num", "2", *conditions)
    mixed = _ptqd_images(out, tmp_path, "--num", "2", *conditions)
    reference = _ptqd_images(out, tmp_path, "--num", "2", "--graph", "reference", "--precision", "w4a8",
                             *conditions)
    for images in (mixed, reference):
        assert np.isfinite(images).all() and images.shape == fp.shape
        assert 0 < np.abs(images - fp).mean() < 0.1


def test_negative_prompt_replaces_the_unconditional_half(tiny_sdxl_export, tiny_dit_export, tmp_path):
    """SDXL zeroes the unconditional text inputs when no negative prompt is given
    (force_zeros_for_empty_prompt); naming one, even "", encodes it instead."""
    out = tiny_sdxl_export
    zeros = _ptqd_images(out, tmp_path, "--num", "1", "--prompt", PROMPTS[0])
    empty = _ptqd_images(out, tmp_path, "--num", "1", "--prompt", PROMPTS[0], "--negative-prompt", "")
    other = _ptqd_images(out, tmp_path, "--num", "1", "--prompt", PROMPTS[0], "--negative-prompt", "a dog")
    assert np.abs(zeros - empty).mean() > 1e-4 and np.abs(empty - other).mean() > 1e-4
    assert_user_error(run_cli("sample", str(tiny_dit_export), "--backend", "onnxruntime", "--negative-prompt",
                              "x", "--output", str(tmp_path / "n.npy")), "text-conditioned")
    assert not (tmp_path / "n.npy").exists()


def _folder(out):
    return Path(json.loads((out / "calibration" / "ptqd.json").read_text())["model"])


def _edited_copy(src, dst, path, **changes):
    import shutil

    shutil.copytree(src, dst)
    doc = json.loads((dst / path).read_text())
    doc.update(changes)
    (dst / path).write_text(json.dumps(doc))
    return dst


def test_each_folder_is_detected_as_its_family_from_configs_alone(tiny_sdxl_export, tiny_dit_export,
                                                                  tiny_pixart_export, tiny_text_export,
                                                                  tiny_class_export, tmp_path):
    from ptqd.errors import UserError
    from ptqd.model import resolve_model

    found = {resolve_model(str(_folder(out))).family.name: out
             for out in (tiny_sdxl_export, tiny_dit_export, tiny_pixart_export, tiny_text_export, tiny_class_export)}
    assert sorted(found) == ["class-unet2d", "dit", "pixart-alpha", "sd-unet", "sdxl-unet"]
    assert resolve_model("digits").family.name == "unet2d"
    refiner = _edited_copy(_folder(tiny_sdxl_export), tmp_path / "refiner", "model_index.json",
                           requires_aesthetics_score=True)
    with pytest.raises(UserError, match="refiner"):
        resolve_model(str(refiner))
    sigma = _edited_copy(_folder(tiny_pixart_export), tmp_path / "sigma", "model_index.json",
                         _class_name="PixArtSigmaPipeline")
    with pytest.raises(UserError, match="PixArt-Sigma is not supported"):
        resolve_model(str(sigma))
    import shutil

    no_second = tmp_path / "no-second"
    shutil.copytree(_folder(tiny_sdxl_export), no_second)
    shutil.rmtree(no_second / "text_encoder_2")
    with pytest.raises(UserError, match="text_encoder_2/"):
        resolve_model(str(no_second))


def test_an_output_written_before_model_families_still_samples(tiny_text_export, tmp_path):
    """pipeline.json format 1 (one CLIP encoder as unet_inputs/max_length) reads as today's spec."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_text_export, out)
    spec = PipelineSpec.load(out / "scheduler")
    old = {"format_version": 1, "kind": spec.kind, "guidance_scale": spec.guidance_scale,
           "unet_inputs": spec.denoiser_inputs, "num_classes": None, "null_class": None,
           "max_length": spec.text_encoders[0]["max_length"], "negative_prompt": "",
           "default_conditions": spec.default_conditions, "latent": True, "image_shape": spec.image_shape}
    (out / "scheduler" / "pipeline.json").write_text(json.dumps(old))
    read = PipelineSpec.load(out / "scheduler")
    # what differs: that output's TensorRT text encoder was its FP32 graph
    assert read.text_encoders == [{**e, "fp16": False} for e in spec.text_encoders]
    assert (read.denoiser, read.denoiser_inputs) == (spec.denoiser, spec.denoiser_inputs)
    np.testing.assert_array_equal(_ptqd_images(out, tmp_path, "--num", "2", "--prompt", "a cat"),
                                  _ptqd_images(tiny_text_export, tmp_path, "--num", "2", "--prompt", "a cat"))
    (out / "scheduler" / "pipeline.json").write_text(json.dumps({**old, "format_version": 7}))
    assert_user_error(run_cli("sample", str(out), "--backend", "onnxruntime", "--output", str(tmp_path / "x.npy")),
                      "pipeline.json does not read")


def test_sampling_an_output_on_onnxruntime_imports_neither_torch_nor_diffusers(tiny_sdxl_export, tmp_path):
    """In a real interpreter: `ptqd sample OUT --backend onnxruntime` (mixed, and an ablation
    refolded from the saved schedule) runs on numpy, onnxruntime and tokenizers."""
    import subprocess
    import sys

    code = ("import sys\nfrom ptqd.cli import main\n"
            "for extra in ([], ['--precision', 'w4a8', '--no-correction']):\n"
            "    try:\n"
            f"        main(['sample', {str(tiny_sdxl_export)!r}, '--backend', 'onnxruntime', '--num', '1',\n"
            f"              '--output', {str(tmp_path / 'x.npy')!r}, '--force', *extra])\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code in (0, None), exc.code\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_pixart_added_conditions_are_graph_inputs_when_the_transformer_uses_them(tiny_pixart_export, tmp_path):
    """PixArt-alpha at 1024 px conditions on resolution and aspect ratio (use_additional_conditions,
    true for sample_size 128): here forced on a tiny transformer, they become graph inputs the
    conditioner fills with the pipeline's values, and ONNX Runtime computes what torch does."""
    from ptqd.calibration.trajectory import TorchUNetEngine
    from ptqd.conditions import example_conditioning, pipeline_spec
    from ptqd.exporter.onnx_fp import export_fp_onnx
    from ptqd.model import load_model
    from ptqd.runtime.onnxruntime import OnnxRuntimeUNet

    import shutil

    from diffusers import PixArtTransformer2DModel

    folder = tmp_path / "pixart"
    shutil.copytree(_folder(tiny_pixart_export), folder)
    config = PixArtTransformer2DModel.load_config(str(folder / "transformer"))
    torch.manual_seed(0)
    PixArtTransformer2DModel.from_config({**config, "use_additional_conditions": True}).save_pretrained(
        str(folder / "transformer"))
    model = load_model(str(folder), 10)
    spec = pipeline_spec(model, None)
    assert spec.constant_inputs == {"resolution": [16.0, 16.0], "aspect_ratio": [1.0]}
    assert [(i["name"], i["dims"]) for i in spec.denoiser_inputs[2:]] == [("resolution", [2]), ("aspect_ratio", [1])]
    cond = example_conditioning(model, spec, 2)
    graph = export_fp_onnx(model.denoiser, tmp_path / "transformer_fp32.onnx", cond)
    assert list(_inputs(graph)) == ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask",
                                    "resolution", "aspect_ratio"]
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([900.0, 100.0], np.float32)
    expected = TorchUNetEngine(model.denoiser)(x, t, **cond)
    assert np.abs(OnnxRuntimeUNet(graph)(x, t, **cond) - expected).max() < 1e-4


def test_dit_in_every_configuration_with_attention_left_to_tensorrt(tiny_dit_export, tmp_path):
    """Every weight Linear quantized in every configuration (INT8, the 4-bit grids, FP8; the
    float engine's FP16 graph), each graph linted; attention's activation-by-activation MatMuls
    and Softmax stay unquantized FP16 in the TensorRT graphs, where TensorRT fuses them."""
    out = tiny_dit_export
    plan = json.loads((out / "onnx" / "precision_plan.json").read_text())["configs"]
    assert sorted(plan) == ["fp16", "fp8", "w4a4", "w4a8", "w8a8"]
    linear = [e for e in plan["fp8"]["layers"] if e["op"] in ("MatMul", "Gemm")]
    assert linear and all(e["requested"] == "fp8" for e in linear if e["role"] not in
                          ("time embedder", "final adaLN modulation", "final layer (eps and variance)"))
    graphs = ["transformer_w4a4.onnx", "transformer_fp8.onnx", "transformer_fp16.onnx"]
    assert run_cli("lint", *(str(out / "onnx" / g) for g in graphs)).returncode == 0
    for name in graphs:
        graph = onnx.load(str(out / "onnx" / name)).graph
        producer = {o: n for n in graph.node for o in n.output}
        inits = {i.name for i in graph.initializer}
        scores = [n for n in graph.node if n.op_type == "MatMul"
                  and not any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                              or i in inits for i in n.input)]
        assert len(scores) == 4   # QK^T and PV in each of the two blocks
        typed = onnx.shape_inference.infer_shapes(onnx.load(str(out / "onnx" / name)))
        types = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
        for node in scores + [n for n in graph.node if n.op_type == "Softmax"]:
            assert {types.get(i) for i in node.input} == {onnx.TensorProto.FLOAT16}, (name, node.name)


def test_a_family_output_resumes_and_reports(tiny_dit_export, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_dit_export, out)
    folder = _folder(tiny_dit_export)
    rerun = run_cli("--model", str(folder), "--bits", "4", "--steps", "10", "--calib-samples", "8", "--no-report",
                    "--no-sensitivity", "--classes", "1,2,3,500", "--configs", "w4a4,fp8,fp16", "--output", str(out),
                    entry="export-trt")
    assert rerun.returncode == 0, rerun.stderr
    assert "up to date" in rerun.stdout
    report = run_cli("report", str(out), "--num", "16")
    assert report.returncode == 0, report.stderr
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert {"fp32", "mixed", "mixed+ptqd", "fp8+ptqd"} <= set(metrics["variants"])
    assert "not computed" in metrics["distribution_metric"]   # no feature network for a user's model
