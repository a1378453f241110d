"""The two 4-bit formats a GPU runs, on the built-in DiT (digits-dit): nvfp4 (NVFP4 Linear
layers, FP8 convolutions) and w4a16 (INT4 weight-only Linear layers, FP16 convolutions).
Their graphs, the lint, and each layer against its torch fake-quant twin."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from ptqd.calibration.fakequant import fake_quant_unet
from ptqd.calibration.params import ConfigQuant, load_params
from ptqd.exporter.lint import lint_model
from ptqd.families import family_of_module
from tests.conftest import run_cli

LINEAR_OPS = ("MatMul", "Gemm")


@pytest.fixture(scope="session")
def dit_4bit(tmp_path_factory):
    """digits-dit calibrated with nvfp4 as the base, w4a16, fp8 and the float engine beside it,
    scheduled by estimated latency on a B200 (5 steps, 8 trajectories, no sensitivity map),
    then exported. The latency ratio is tight (1.05): digits-dit is so small that the FP16 work
    outside its Linear layers sets most of every configuration's step (estimated: nvfp4 1.4 µs,
    fp8 1.5, fp16 1.9 at batch 2), so a looser ratio affords all-FP8 and FP16 steps."""
    out = tmp_path_factory.mktemp("dit-4bit") / "out"
    result = run_cli("calibrate", "--model", "digits-dit", "--format", "nvfp4", "--configs", "w4a16,fp8,fp16",
                     "--mixed-precision", "latency:1.05", "--target-gpu", "b200", "--steps", "5",
                     "--calib-samples", "8", "--no-sensitivity", "--output", str(out))
    assert result.returncode == 0, result.stderr
    (out.parent / "calibrate.log").write_text(result.stdout)
    exported = run_cli("export", str(out))
    assert exported.returncode == 0, exported.stderr
    return out


def test_the_latency_schedule_on_b200_runs_nvfp4_steps_priced_at_the_fp4_rate(dit_4bit):
    import json

    doc = json.loads((dit_4bit / "calibration" / "ptqd.json").read_text())
    lat, ms = doc["latency"], doc["latency"]["ms_per_step"]
    assert lat["kind"] == "estimated" and lat["target_gpu"] == "B200 (HGX)"
    assert set(ms) == {"fp16", "nvfp4", "w4a16", "fp8"}
    # FP4 Linear layers beat FP8's; INT4 weight-only saves weight traffic only, never beats FP8
    assert ms["nvfp4"] < ms["fp8"] < ms["fp16"] and ms["fp8"] <= ms["w4a16"] < ms["fp16"]
    schedule = [s["config"] for s in doc["steps"]]
    assert "nvfp4" in schedule
    assert lat["schedule_ms"] <= 1.05 * min(ms.values()) * len(schedule) + 1e-12
    assert doc["configs"]["nvfp4"]["format"] == "nvfp4"


@pytest.fixture(scope="session")
def digits_dit():
    from ptqd.model import load_denoiser, resolve_model

    return load_denoiser(resolve_model("digits-dit"))


def _graph(out, name) -> onnx.ModelProto:
    return onnx.load(str(out / "onnx" / name))


def _weight_dqs(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Weight DequantizeLinear nodes (constant input) feeding a layer, by the layer they feed."""
    inits = {i.name for i in model.graph.initializer}
    users = {i: n for n in model.graph.node for i in n.input}
    return {users[n.output[0]].name: n for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.output[0] in users
            and users[n.output[0]].op_type != "DequantizeLinear"}


def test_nvfp4_tensorrt_graph_holds_fp4_linears_in_blocks_of_16_and_fp8_convolutions(dit_4bit):
    model = _graph(dit_4bit, "transformer_nvfp4.onnx")
    opset = {o.domain: o.version for o in model.opset_import}
    assert opset[""] == 23 and "trt" in opset   # FLOAT4E2M1 needs opset 23
    assert lint_model(model, "tensorrt") == []
    types = {i.name: i.data_type for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    quant = load_params(dit_4bit / "calibration")["nvfp4"]
    dqs = _weight_dqs(model)
    fp4 = [n for layer, n in dqs.items() if by_name[layer].op_type in LINEAR_OPS]
    fp8 = [n for layer, n in dqs.items() if by_name[layer].op_type == "Conv"]
    assert len(fp4) + len(fp8) == len(quant.layers) and fp4
    for dq in fp4:
        attrs = {a.name: a.i for a in dq.attribute}
        assert types[dq.input[0]] == TensorProto.FLOAT4E2M1 and attrs["block_size"] == 16
        # the block scale is the DQ of E4M3 values by one global scale
        scale_dq = next(n for n in model.graph.node if dq.input[1] in n.output)
        assert scale_dq.op_type == "DequantizeLinear" and types[scale_dq.input[0]] == TensorProto.FLOAT8E4M3FN
    assert all(types[dq.input[0]] == TensorProto.FLOAT8E4M3FN for dq in fp8)
    # every quantized Linear's input goes through TensorRT's dynamic FP4 quantize, blocks of 16
    dynamic = [n for n in model.graph.node if n.op_type == "TRT_FP4DynamicQuantize"]
    assert len(dynamic) == len(fp4)
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 16 for n in dynamic)


def test_w4a16_graphs_hold_int4_weights_in_blocks_of_128_and_the_cpu_graph_runs_matmulnbits(dit_4bit):
    quant = load_params(dit_4bit / "calibration")["w4a16"]
    for name in ("transformer_w4a16.onnx", "transformer_w4a16.ort.onnx"):
        model = _graph(dit_4bit, name)
        assert lint_model(model, "tensorrt" if name.count(".") == 1 else "onnxruntime") == []
        types = {i.name: i.data_type for i in model.graph.initializer}
        dqs = _weight_dqs(model)
        assert len(dqs) == len(quant.layers)
        for dq in dqs.values():
            assert types[dq.input[0]] == TensorProto.INT4
            assert {a.name: a.i for a in dq.attribute}["block_size"] == 128
        # weight-only: no activation is quantized, and the convolutions stay float
        assert not any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    fast = _graph(dit_4bit, "transformer_w4a16.cpu.onnx")
    nbits = [n for n in fast.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(quant.layers) and all(n.domain == "com.microsoft" for n in nbits)
    assert not any(n.op_type == "DequantizeLinear" for n in fast.graph.node)


def test_precision_plan_says_how_each_kind_of_layer_runs(dit_4bit):
    import json

    plan = json.loads((dit_4bit / "onnx" / "precision_plan.json").read_text())
    for cfg, conv_format in (("nvfp4", "fp8"), ("w4a16", "fp16")):
        layers = plan["configs"][cfg]["layers"]
        convs = [e for e in layers if e["op"] == "Conv"]
        assert convs and all(e["format"] == conv_format for e in convs)
    nvfp4_linear = next(e for e in plan["configs"]["nvfp4"]["layers"] if e["requested"] == "nvfp4")
    assert "FLOAT4E2M1" in nvfp4_linear["tensorrt"]["weights"] and "Blackwell" in nvfp4_linear["tensorrt"]["executes"]
    w4a16_conv = next(e for e in plan["configs"]["w4a16"]["layers"] if e["op"] == "Conv")
    assert "weight-only" in w4a16_conv["reason"]


def _inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 16, 16, generator=gen)
    return x, torch.tensor([900.0, 500.0, 100.0, 5.0]), torch.tensor([0, 3, 7, 10])


@pytest.mark.parametrize("cfg, graphs", [
    ("nvfp4", ("onnxruntime",)),
    ("w4a16", ("tensorrt", "onnxruntime", "cpu-fast")),
])
def test_each_layer_alone_matches_its_fake_quant_twin(dit_4bit, digits_dit, cfg, graphs):
    """One layer quantized, the rest float (as test_export's check of the other formats): the
    ONNX Runtime graphs compute the twin's numbers: nvfp4's stand-in for TensorRT's FP4 ops
    (ONNX Runtime has none) and w4a16's blocked INT4 DQ, in TensorRT's storage (FP32, before
    the FP16 pass) and ONNX Runtime's, and the MatMulNBits kernel. Every Linear and the
    convolutions nvfp4 quantizes in FP8 are checked (every other layer for w4a16).

    Tolerance: w4a16 quantizes no activation, so its graphs agree with the twin to float
    error everywhere. nvfp4 rounds the layer's input, whose float value differs between torch
    and ONNX Runtime in the last bits (their layer norms sum in different orders): an element
    on a rounding boundary, or a block maximum on an E4M3 scale boundary, then lands one step
    the other way, and a 4-bit step is large. Measured over digits-dit's 42 quantized layers in
    two calibrations: 37-39 agree to 1e-5 everywhere; the others differ in 0.2-1.6 % of the
    outputs (up to 1.1e-2, the flipped step), a mean difference of at most 1.2e-5. Held to:
    every layer's mean difference under 1e-4, and four layers in five exact to 1e-4 (a wrong
    scale, block or rounding moves every output of every layer)."""
    from ptqd.exporter.qdq import ONNXRUNTIME, ONNXRUNTIME_FAST, TENSORRT, insert_qdq

    storages = {"tensorrt": TENSORRT, "onnxruntime": ONNXRUNTIME, "cpu-fast": ONNXRUNTIME_FAST}
    quant = load_params(dit_4bit / "calibration")[cfg]
    fp_model = onnx.load(str(dit_4bit / "onnx" / "transformer_fp32.onnx"))
    family = family_of_module(digits_dit)
    x, t, labels = _inputs()
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": labels.numpy()}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    worst = dict.fromkeys(graphs, 0.0)
    mean_worst, exact = 0.0, []
    with torch.no_grad():
        reference = family.forward(digits_dit, x, t, class_labels=labels).numpy()
    moved = 0.0
    # w4a16's three graphs share every line of the insertion but storage: every other layer
    layers = sorted(quant.layers)[::2] if cfg == "w4a16" else sorted(quant.layers)
    for layer in layers:
        single = ConfigQuant(quant.config, {layer: quant.layers[layer]})
        with torch.no_grad():
            expected = family.forward(fake_quant_unet(digits_dit, single), x, t, class_labels=labels).numpy()
        moved = max(moved, float(np.abs(expected - reference).max()))
        for flavour in graphs:
            graph = insert_qdq(fp_model, single, storages[flavour])
            sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            diff = np.abs(sess.run(None, feeds)[0][:, :1] - expected)
            worst[flavour] = max(worst[flavour], float(diff.max()))
            mean_worst = max(mean_worst, float(diff.mean()))
            exact.append(float(diff.max()) < 1e-4)
    assert moved > 0.05, "quantizing a layer moves eps: the comparison can tell"
    if cfg == "w4a16":
        assert max(worst.values()) < 2e-3, worst
    assert mean_worst < 1e-4 and np.mean(exact) >= 0.8, (mean_worst, np.mean(exact), worst)


def test_nvfp4_activations_are_quantized_per_block_at_run_time():
    """What makes 4-bit activations usable: each block of 16 gets its own scale from its own
    maximum, so a block of small values keeps its resolution beside a block of large ones; the
    calibrated global scale maps the calibrated maximum onto the top of E4M3's range."""
    from ptqd.quant_math import E2M1, E4M3, fake_quantize, fake_quantize_dynamic, scale_for_range

    x = torch.cat([torch.linspace(-0.01, 0.01, 16), torch.linspace(-10, 10, 16)]).reshape(1, 32)
    global_scale = scale_for_range(x.abs().max() / E2M1.qmax, E4M3)
    per_block = fake_quantize_dynamic(x, global_scale, E2M1, 16)
    per_tensor = fake_quantize(x, scale_for_range(x.abs().max(), E2M1), E2M1)
    small = slice(0, 16)
    assert (per_block[0, small] != 0).sum() >= 8          # the small block keeps its values
    assert (per_tensor[0, small] == 0).all()               # one scale rounds them all away
    # the block holding the maximum gets the top block scale: per tensor's, exactly
    assert torch.equal(per_block[0, 16:], per_tensor[0, 16:])
    # past the calibrated range the block scale saturates at E4M3's top: values clip there
    clipped = fake_quantize_dynamic(2 * x, global_scale, E2M1, 16)
    assert clipped.abs().max() == pytest.approx(10.0)
    assert torch.equal(fake_quantize_dynamic(torch.zeros(2, 16), global_scale, E2M1, 16), torch.zeros(2, 16))


def test_weight_global_scales_are_saved_and_the_blocks_are_e4m3(dit_4bit):
    import ml_dtypes

    quant = load_params(dit_4bit / "calibration")["nvfp4"]
    linears = [lq for lq in quant.layers.values() if lq.weight_global is not None]
    assert linears
    for lq in linears:
        codes = lq.weight_scale.numpy()
        assert codes.ndim == 2 and (codes > 0).all()
        # the stored block scales are E4M3 values: converting them to E4M3 changes nothing
        assert np.array_equal(codes.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), codes)
        # one FP16-exact number in FP16's normal range: the FP16 graph holds it unchanged
        for g in (lq.weight_global, lq.act_scale):
            assert float(g) == float(g.half()) and float(g) >= 2.0 ** -14
    raw = onnx.load(str(dit_4bit / "onnx" / "transformer_nvfp4.onnx"))
    fp4 = [numpy_helper.to_array(i) for i in raw.graph.initializer if i.data_type == TensorProto.FLOAT4E2M1]
    assert fp4 and all(np.isin(np.abs(a.astype(np.float32)), [0, 0.5, 1, 1.5, 2, 3, 4, 6]).all() for a in fp4)


@pytest.mark.parametrize("compute_capability, builds", [("9.0", False), ("10.0", True)])
def test_build_script_refuses_nvfp4_plans_on_gpus_before_blackwell_fake(dit_4bit, tmp_path, compute_capability,
                                                                        builds):
    """The generated build script (fake trtexec and Polygraphy, a fake nvidia-smi naming the
    GPU): on an H100 (compute capability 9.0) it stops before building anything and says which
    plan needs what; on a Blackwell GPU it builds every plan the schedule uses."""
    import json
    import shutil

    from tests.engines.test_build import _run_build_script

    out = tmp_path / "out"
    shutil.copytree(dit_4bit, out)
    built = run_cli("build", str(out), "--backend", "onnxruntime")
    assert built.returncode == 0, built.stderr
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    name = "NVIDIA H100 80GB HBM3" if compute_capability == "9.0" else "NVIDIA B200"
    (bin_dir / "nvidia-smi").write_text(
        f'#!/bin/sh\ncase "$*" in *compute_cap*) echo {compute_capability};; *) echo "{name}";; esac\n')
    (bin_dir / "nvidia-smi").chmod(0o755)
    result, calls = _run_build_script(out, tmp_path)
    schedule = {s["config"] for s in json.loads((out / "calibration" / "ptqd.json").read_text())["steps"]}
    if builds:
        assert result.returncode == 0, result.stderr
        assert {f"transformer_{c}.plan" for c in schedule} <= {p.name for p in (out / "engines").glob("*.plan")}
    else:
        assert result.returncode == 1 and calls == []
        assert result.stderr.strip() == (
            "engines/transformer_nvfp4.plan needs a GPU of compute capability >= 10 (NVFP4 tensor cores: "
            f"Blackwell, TensorRT >= 10.8); this one is {name} (9.0): build on such a GPU, or export without that "
            "configuration")


def test_sampling_the_4bit_schedule_on_onnx_runtime_matches_torch(dit_4bit, tmp_path):
    """The latency schedule (nvfp4 steps, and whatever else it chose) sampled by the CPU
    sampler on its CPU graphs (nvfp4's standard-op stand-in, MatMulNBits for w4a16) and by the
    torch fake-quant sampler, same seeds: far closer to each other than to full precision."""
    files = {}
    runs = {"torch": ["--backend", "torch"], "onnxruntime": ["--backend", "onnxruntime"],
            "fp": ["--backend", "torch", "--precision", "fp32"],
            "w4a16": ["--backend", "onnxruntime", "--precision", "w4a16"],
            "w4a16-torch": ["--backend", "torch", "--precision", "w4a16"]}
    for name, args in runs.items():
        files[name] = tmp_path / f"{name}.npy"
        r = run_cli("sample", str(dit_4bit), *args, "--num", "8", "--seed", "3", "--output", str(files[name]))
        assert r.returncode == 0, r.stderr
    images = {name: np.load(path) for name, path in files.items()}
    assert all(np.isfinite(v).all() for v in images.values())
    gap = np.abs(images["torch"] - images["fp"]).mean()
    assert np.abs(images["torch"] - images["onnxruntime"]).mean() < 0.5 * gap
    # MatMulNBits computes w4a16's numbers in float: as close to the twin as float order allows
    assert np.abs(images["w4a16-torch"] - images["w4a16"]).mean() < 1e-3


def test_lint_catches_4bit_graphs_tensorrt_would_not_run(dit_4bit):
    """The rules the new layouts need, each broken once in a real graph: FP4 blocks of other
    than 16, FP4 into a convolution's place, INT4 blocks across the wrong axis, a run-time
    scale that is not a dynamic quantize's, FP4 below opset 23."""
    def broken(name, edit):
        model = _graph(dit_4bit, name)
        edit(model)
        return {v.rule for v in lint_model(model, "tensorrt")}

    def weight_dq(model, dtype):
        inits = {i.name: i.data_type for i in model.graph.initializer}
        return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) == dtype)

    def set_attr(node, name, value):
        next(a for a in node.attribute if a.name == name).i = value

    assert broken("transformer_nvfp4.onnx", lambda m: set_attr(weight_dq(m, TensorProto.FLOAT4E2M1), "block_size", 32)) \
        >= {"fp4-blocked"}
    dynamic = lambda m: next(n for n in m.graph.node if n.op_type == "TRT_FP4DynamicQuantize")
    assert "fp4-blocked" in broken("transformer_nvfp4.onnx", lambda m: set_attr(dynamic(m), "block_size", 32))
    def other_axis(model):
        dq = weight_dq(model, TensorProto.INT4)
        set_attr(dq, "axis", 1 - next(a.i for a in dq.attribute if a.name == "axis"))
    assert broken("transformer_w4a16.onnx", other_axis) >= {"block-axis"}
    assert broken("transformer_w4a16.onnx", lambda m: set_attr(weight_dq(m, TensorProto.INT4), "block_size", 32)) \
        >= {"int4-blocked"}
    default_opset = lambda m: next(o for o in m.opset_import if o.domain in ("", "ai.onnx"))
    assert "opset" in broken("transformer_nvfp4.onnx", lambda m: setattr(default_opset(m), "version", 21))

    def computed_scale(model):   # the activation's block scale from a Mul instead of the dynamic quantize
        dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith(
            "input_quant/scale/DequantizeLinear"))
        dq.op_type = "Mul"
    assert "scale-constant" in broken("transformer_nvfp4.onnx", computed_scale)
