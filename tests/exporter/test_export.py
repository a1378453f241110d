"""export-trt on the built-in model: graphs, plan, scheduler and manifest, and their parity
with the torch fake-quant model they were derived from."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from ptqd.calibration.fakequant import fake_quant_unet
from ptqd.calibration.params import load_params
from ptqd.runtime.onnxruntime import OnnxRuntimeUNet
from ptqd.exporter.lint import lint_model
from ptqd.output import file_sha256
from tests.conftest import run_cli



def test_every_artifact_is_in_the_manifest_with_its_hash(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    listed = {a["path"]: a for a in manifest["artifacts"]}
    # Python caches are left out: Triton's Python backend writes one beside each model.py it
    # imports when a test serves OUT/triton
    on_disk = {p.relative_to(exported).as_posix() for p in exported.rglob("*")
               if p.is_file() and p.name != "manifest.json" and "__pycache__" not in p.parts}
    assert set(listed) == on_disk
    for path, entry in listed.items():
        assert entry["sha256"] == file_sha256(exported / path)
        assert entry["bytes"] == (exported / path).stat().st_size
    for name in ("onnx/unet_fp32.onnx", "onnx/unet_w4a8.onnx", "onnx/unet_w4a8.ort.onnx",
                 "onnx/unet_w4a8.cpu.onnx",
                 "onnx/precision_plan.json", "scheduler/ptqd_schedule.json",
                 "scheduler/scheduler_config.json", "calibration/ptqd.json"):
        assert name in listed
    assert manifest["model_sha256"] and manifest["tools"]["onnxruntime"]


def test_graphs_pass_checker_and_lint_and_store_4_bit_as_declared(exported):
    for path in sorted((exported / "onnx").glob("unet_w*.onnx")):
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        target = "onnxruntime" if path.name.endswith((".ort.onnx", ".cpu.onnx")) else "tensorrt"
        assert lint_model(model, target) == [], path.name
        types = {i.data_type for i in model.graph.initializer}
        if "w4a8" in path.name:
            # ONNX Runtime's reference executes INT4; TensorRT and onnxruntime's fused integer
            # kernels get the 4-bit grid in INT8 storage
            assert (TensorProto.INT4 in types) == path.name.endswith(".ort.onnx"), path.name
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {21}


def test_fp8_and_float_engine_graphs_are_written_typed_and_linted(fp8_calibrated):
    """fp8's TensorRT and reference graphs hold FLOAT8E4M3FN weights and Q outputs only (its CPU
    graph is the reference: onnxruntime has no FP8 kernels); the float engine (fp16) has its
    FP16 TensorRT graph without a quantizer, and runs unet_fp32.onnx in ONNX Runtime."""
    out, _ = fp8_calibrated
    names = {p.name for p in (out / "onnx").glob("unet_*.onnx")}
    assert {"unet_fp8.onnx", "unet_fp8.ort.onnx", "unet_fp16.onnx", "unet_fp32.onnx"} <= names
    assert not names & {"unet_fp8.cpu.onnx", "unet_fp16.ort.onnx", "unet_fp16.cpu.onnx"}
    for name in ("unet_fp8.onnx", "unet_fp8.ort.onnx", "unet_fp16.onnx"):
        model = onnx.load(str(out / "onnx" / name))
        target = "onnxruntime" if name.endswith(".ort.onnx") else "tensorrt"
        assert lint_model(model, target) == [], name
        types = {i.data_type for i in model.graph.initializer}
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        if "fp8" in name:
            assert TensorProto.FLOAT8E4M3FN in types and not types & {TensorProto.INT8, TensorProto.INT4}, name
            assert qdq
        else:
            # FP16 inside: the only float32 constants are Resize's scales, float32 by ONNX's spec
            fp32 = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
            assert not qdq and fp32 and all(n.op_type == "Resize" for n in model.graph.node
                                            if set(n.input) & fp32)
    plan = json.loads((out / "onnx" / "precision_plan.json").read_text())
    fp8 = [l for l in plan["configs"]["fp8"]["layers"] if l["requested"] == "fp8"]
    assert fp8 and all(l["tensorrt"]["executes"].startswith("FP8 kernel") for l in fp8)
    assert all(l["requested"] == "fp16" and l["tensorrt"]["weights"] == "FP16"
               for l in plan["configs"]["fp16"]["layers"])


def test_precision_plan_names_every_layer_and_backend(exported):
    plan = json.loads((exported / "onnx" / "precision_plan.json").read_text())
    layers = plan["configs"]["w4a8"]["layers"]
    kept = [l for l in layers if l["requested"] == "fp32"]
    assert {l["layer"] for l in kept} >= {"conv_in", "conv_out"}
    quantized = [l for l in layers if l["requested"] == "w4a8"]
    assert quantized and all({"tensorrt", "onnxruntime"} <= set(l) for l in quantized)
    assert plan["configs"]["w4a8"]["float_ops"]["attention_matmuls"]


def _layer_integers(graph_path, x, t):
    """Every QuantizeLinear output of a QDQ graph (the integer activations), by layer."""
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(graph_path))
    zero_point_type = {i.name: i.data_type for i in model.graph.initializer}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    names = [n.output[0] for n in quantizers]
    for node in quantizers:
        model.graph.output.append(helper.make_tensor_value_info(
            node.output[0], zero_point_type[node.input[2]], None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(names, {"sample": x, "timestep": t})
    # onnxruntime hands FP8 tensors back as their raw uint8 codes
    return {n.split("/input_quant")[0]: _code_steps(o) if o.dtype == np.uint8 else o.astype(np.float32)
            for n, o in zip(names, outs)}


def _code_steps(codes: np.ndarray) -> np.ndarray:
    """E4M3 codes as positions on the grid, so that neighbours differ by 1: the code's magnitude
    bits (ordered like the values they encode) with the sign bit's sign."""
    magnitude = (codes & 0x7F).astype(np.float32)
    return np.where(codes & 0x80, -magnitude, magnitude)


def _code_values(steps: np.ndarray) -> np.ndarray:
    """E4M3 grid positions (_code_steps) back to the values they encode."""
    import ml_dtypes

    codes = np.where(steps < 0, 0x80 + np.abs(steps), steps).astype(np.uint8)
    return codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _grid_steps(values: np.ndarray, dtype: int) -> np.ndarray:
    """Grid values as positions on their grid: integers are their own positions, E4M3 values
    those of their codes."""
    if dtype != TensorProto.FLOAT8E4M3FN:
        return values
    import ml_dtypes

    return _code_steps(values.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


def _tensorrt_fp32_graph(exported, cfg):
    """The TensorRT QDQ graph before its FP16 pass: insert_qdq's TensorRT storage, folded."""
    from ptqd.exporter.cleanup import fold_and_clean
    from ptqd.exporter.qdq import TENSORRT, insert_qdq

    qdq = insert_qdq(onnx.load(str(exported / "onnx" / "unet_fp32.onnx")),
                     load_params(exported / "calibration")[cfg], TENSORRT)
    return fold_and_clean(qdq)[0]


def test_tensorrt_graph_is_the_fp16_pass_over_the_folded_qdq_graph(exported):
    """What the integer tests below check in FP32 is exactly what the shipped FP16 graph was
    made from: the file is the FP16 pass over it, byte for byte."""
    from ptqd.exporter.fp16 import convert_to_fp16, tensorrt_exceptions

    for cfg in ("w4a8", "w8a8"):
        folded = _tensorrt_fp32_graph(exported, cfg)
        fp16 = convert_to_fp16(folded, tensorrt_exceptions(folded))
        assert fp16.SerializeToString() == (exported / "onnx" / f"unet_{cfg}.onnx").read_bytes(), cfg


def _output_of(cfg, exported, request):
    """The session export for the integer configurations; the fp8-based one for fp8."""
    return request.getfixturevalue("fp8_calibrated")[0] if cfg == "fp8" else exported


def _graph_file(exported, cfg, flavour, tmp_path):
    if flavour == "onnxruntime":
        return exported / "onnx" / f"unet_{cfg}.ort.onnx"
    path = tmp_path / f"unet_{cfg}.fp32.onnx"
    onnx.save(_tensorrt_fp32_graph(exported, cfg), str(path))
    return path


@pytest.mark.parametrize("cfg, flavour", [("w4a8", "tensorrt"), ("w4a8", "onnxruntime"), ("w8a8", "tensorrt"),
                                         ("fp8", "tensorrt"), ("fp8", "onnxruntime")])
def test_qdq_graph_matches_the_torch_fake_quant_model(exported, builtin_unet, cfg, flavour, tmp_path, request):
    """Tolerance: both compute the same integers from the same scales with the same rounding
    (ptqd.quant_math), but their float convolutions sum in different orders. An activation
    within float error of a rounding boundary then rounds one step the other way, and that
    one-step flip perturbs everything downstream, where more values can flip: mismatches are
    ±1 step, absent in the first layer and growing with depth (measured: up to 12 % of the
    integers in the up blocks). So the whole graph is held to: every calibrated layer has its
    quantizer, the first one is exact, and end to end the two differ by far less than the
    quantization error they both model. Each layer's own correctness is checked without the
    cascade in test_each_layer_alone_matches_its_fake_quant_twin. onnxruntime runs the graph
    with float kernels: its integer kernels saturate on CPUs without VNNI (session_options).
    The TensorRT flavour is checked before its FP16 pass (the integers are the point here; the
    shipped FP16 file is that graph's FP16 pass, see the test above, and its distance from it
    is test_fp16_tensorrt_graph_is_within_fp16_rounding_of_its_fp32_twin's)."""
    from ptqd.calibration.fakequant import FakeQuantLayer
    from ptqd.quant_math import quantize

    exported = _output_of(cfg, exported, request)
    params = load_params(exported / "calibration")
    act_type = TensorProto.FLOAT8E4M3FN if cfg == "fp8" else TensorProto.INT8
    path = _graph_file(exported, cfg, flavour, tmp_path)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 1, 16, 16, generator=gen), torch.linspace(980, 0, 8)
    model = fake_quant_unet(builtin_unet, params[cfg])
    ours = {}
    for layer, module in model.named_modules():
        if isinstance(module, FakeQuantLayer):
            module.register_forward_pre_hook(lambda m, inp, layer=layer: ours.__setitem__(
                layer, _grid_steps(quantize(inp[0], m.act_scale, m.act_grid).numpy(), act_type)))
    expected = model(x, t).sample.numpy()
    graph_ints = _layer_integers(path, x.numpy(), t.numpy())
    assert set(graph_ints) == set(params[cfg].layers)
    assert np.array_equal(graph_ints["down_blocks.0.resnets.0.conv1"], ours["down_blocks.0.resnets.0.conv1"])
    got = OnnxRuntimeUNet(path, float_kernels=True)(x.numpy(), t.numpy())
    quant_error = np.abs(expected - builtin_unet(x, t).sample.numpy()).mean()
    assert np.abs(got - expected).mean() < 0.25 * quant_error


@pytest.mark.parametrize("cfg", ["w4a8", "w8a8", "fp8"])
def test_fp16_tensorrt_graph_is_within_fp16_rounding_of_its_fp32_twin(exported, builtin_unet, cfg, tmp_path,
                                                                    request):
    """The shipped FP16 graph against the FP32 graph it was made from, same inputs. FP16 keeps
    11 significant bits, so activations near a rounding boundary flip one step, and the flips
    cascade as in the FP32 comparison above, only more: measured on three input seeds, the
    first layer's integers agree at 99.5-99.6 % (no difference over one step), the worst
    layers (up_blocks.1 attention projections) at 54-56 % with up to 5 steps apart, and end to
    end the mean |eps| difference is 0.0037-0.0042 whatever the configuration: 0.13-0.15 of
    w4a8's quantization error and 0.26-0.29 of w8a8's (whose error is half as large). Held to:
    every quantizer present, the first layer within one step at >= 99 %, and end to end under
    half the quantization error (a wrong scale type, axis or cast costs at least all of it).
    fp8's first layer is held to E4M3's relative steps instead (below)."""
    exported = _output_of(cfg, exported, request)
    fp32_path = _graph_file(exported, cfg, "tensorrt", tmp_path)
    fp16_path = exported / "onnx" / f"unet_{cfg}.onnx"
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 1, 16, 16, generator=gen), torch.linspace(980, 0, 8)
    ints32, ints16 = (_layer_integers(p, x.numpy(), t.numpy()) for p in (fp32_path, fp16_path))
    assert set(ints16) == set(ints32) == set(load_params(exported / "calibration")[cfg].layers)
    first = "down_blocks.0.resnets.0.conv1"
    if cfg == "fp8":
        # E4M3 is fine near zero, so FP16's absolute rounding of small inputs moves them several
        # codes (measured: 98.7 % equal, 99.9 % within one code, the rest under 1/16 of the
        # scale apart, at values under 0.41 x scale); held to one code's relative step (1/8) or
        # 1/16 of the scale, whichever is larger
        v16, v32 = (_code_values(ints[first]) for ints in (ints16, ints32))
        assert (np.abs(v16 - v32) <= np.maximum(0.125 * np.maximum(np.abs(v16), np.abs(v32)), 0.0625)).all()
        assert (ints16[first] == ints32[first]).mean() >= 0.98
    else:
        assert np.abs(ints16[first] - ints32[first]).max() <= 1
        assert (ints16[first] == ints32[first]).mean() >= 0.99
    eps32, eps16 = (OnnxRuntimeUNet(p, float_kernels=True)(x.numpy(), t.numpy()) for p in (fp32_path, fp16_path))
    quant_error = np.abs(eps32 - builtin_unet(x, t).sample.numpy()).mean()
    assert eps16.dtype == np.float32
    # fp8: every flip of a small input is its own, so FP16 moves eps more (measured 0.0086, 0.53
    # of fp8's quantization error on this fixture): held to under the error itself
    assert np.abs(eps16 - eps32).mean() < (1.0 if cfg == "fp8" else 0.5) * quant_error


@pytest.mark.parametrize("cfg", ["w4a8", "fp8"])
def test_each_layer_alone_matches_its_fake_quant_twin(exported, builtin_unet, cfg, request):
    """One layer quantized, the rest float: inputs agree to float precision, so no flip can
    cascade and each layer's scale, axis, storage and rounding are checked on their own, in
    both storages (TensorRT's and ONNX Runtime's, the same FP8 for fp8). The TensorRT storage
    is checked in FP32, before the FP16 pass (whose rounding alone moves eps by ~4e-3, see the
    test above). fp8 shares every line of the insertion but its storage with w4a8, so every
    third of its layers is checked (convolutions and linears both)."""
    from ptqd.calibration.params import ConfigQuant
    from ptqd.exporter.qdq import ONNXRUNTIME, TENSORRT, insert_qdq

    import onnxruntime as ort

    exported = _output_of(cfg, exported, request)
    quant = load_params(exported / "calibration")[cfg]
    fp_model = onnx.load(str(exported / "onnx" / "unet_fp32.onnx"))
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 1, 16, 16, generator=gen), torch.tensor([900.0, 500.0, 100.0, 5.0])
    layers = sorted(quant.layers)[::3] if cfg == "fp8" else sorted(quant.layers)
    kinds = {type(builtin_unet.get_submodule(layer)).__name__ for layer in layers}
    assert kinds == {"Conv2d", "Linear"}
    worst = {"tensorrt": 0.0, "onnxruntime": 0.0}
    # the graph run exactly as written (no fusion, no folding): what the twin computes, and a
    # session made in a third of the time over 89 layers x 2 storages
    as_written = ort.SessionOptions()
    as_written.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for layer in layers:
        single = ConfigQuant(quant.config, {layer: quant.layers[layer]})
        expected = fake_quant_unet(builtin_unet, single)(x, t).sample.numpy()
        for flavour, storage in (("tensorrt", TENSORRT), ("onnxruntime", ONNXRUNTIME)):
            if flavour == "tensorrt" and cfg == "fp8":
                continue  # the same FP8 storage as onnxruntime's
            graph = insert_qdq(fp_model, single, storage)
            sess = ort.InferenceSession(graph.SerializeToString(), as_written, providers=["CPUExecutionProvider"])
            got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy()})[0]
            worst[flavour] = max(worst[flavour], float(np.abs(got - expected).max()))
    assert max(worst.values()) < 2e-3, worst


def test_ptqd_statistics_recomputed_from_the_exported_graphs_agree(exported):
    """Run the FP and QDQ graphs (onnxruntime, no torch) on the calibration seeds' FP
    trajectory and re-estimate k, bias and sigma_q: they must match calibration/ptqd.json.
    The QDQ graph is the deployed FP16 TensorRT graph: its FP16 rounding moved the statistics
    by at most |dk| 0.0016, |dbias| 6.8e-4 and 1.9 % of sigma_q (against 0.0003, 1.3e-4 and
    1.0 % for the FP32 reference graph), inside the tolerances below."""
    from ptqd.calibration.data import CALIBRATION_INDEX_OFFSET
    from ptqd.calibration.noise_stats import step_stats
    from ptqd.runtime.noise import SampleNoise
    from ptqd.runtime.schedule import FoldedSchedule, apply_step
    from ptqd.ddim import build_schedule
    from ptqd.model import load_scheduler_config, resolve_model

    doc = json.loads((exported / "calibration" / "ptqd.json").read_text())
    n, n_fit = doc["calib_samples"], doc["calib_samples"] * 3 // 4
    fp = OnnxRuntimeUNet(exported / "onnx" / "unet_fp32.onnx")
    q = OnnxRuntimeUNet(exported / "onnx" / "unet_w4a8.onnx")
    shape = FoldedSchedule.load(exported / "scheduler").sample_shape
    # calibration recorded the uncorrected full-precision trajectory
    fp_sched = build_schedule(load_scheduler_config(resolve_model("digits")), doc["num_inference_steps"],
                              doc["eta"], shape, ["fp32"] * doc["num_inference_steps"])
    noise = SampleNoise(doc["seed"], CALIBRATION_INDEX_OFFSET, n, tuple(fp_sched.sample_shape))
    x = noise.initial()
    for step, ref in zip(fp_sched.steps, doc["stats"]["w4a8"]):
        t = np.full(n, float(step.timestep), np.float32)
        eps, eps_q = fp(x, t), q(x, t)
        e, d = torch.from_numpy(eps), torch.from_numpy(eps_q - eps)
        st = step_stats(e[:n_fit], d[:n_fit], e[n_fit:], d[n_fit:], mode=ref["correction"])
        assert st.k == pytest.approx(ref["k"], abs=0.01)
        assert st.bias == pytest.approx(ref["bias"], abs=2e-3)
        assert st.sigma_q == pytest.approx(ref["sigma_q"], rel=0.05)
        x = apply_step(fp_sched, step, x, eps, None)


def test_onnxruntime_sampler_matches_torch_fake_quant_sampler(exported, tmp_path):
    """Mixed schedule, PTQD-corrected, same seeds, images in [0, 1]. The reference graphs
    are fake-quant's exact twins but for float summation order, whose rounding flips cascade
    over the steps (measured: 2.3e-3 mean, against 8.3e-3 between fake-quant and FP32), so
    they must agree with torch far better than either agrees with FP32: under half the
    quantization effect. The CPU-fast graphs also round every layer output to 8 bits
    (measured: 5.4e-3): within 1 % of the range. (With GPTQ weights, the default since
    issue 16, fake-quant is so close to FP32 that this output rounding is as large as the
    quantization effect itself: measured 5.72e-3 to fake-quant vs 5.67e-3 to FP32, so "nearer
    to fake-quant than to FP32" no longer holds and is not asserted.)"""
    files = {}
    runs = {"torch": ["--backend", "torch"], "reference": ["--backend", "onnxruntime", "--graph", "reference"],
            "fast": ["--backend", "onnxruntime"], "fp": ["--backend", "torch", "--precision", "fp32"]}
    for name, args in runs.items():
        files[name] = tmp_path / f"{name}.npy"
        r = run_cli("sample", str(exported), *args, "--num", "8", "--seed", "3", "--output", str(files[name]))
        assert r.returncode == 0, r.stderr
    torch_, ref, fast, fp = (np.load(files[n]) for n in ("torch", "reference", "fast", "fp"))
    assert np.abs(torch_ - ref).mean() < 0.5 * np.abs(torch_ - fp).mean()
    assert np.abs(torch_ - fast).mean() < 1e-2


def test_cpu_fast_graph_fuses_into_integer_kernels(exported, builtin_unet, tmp_path):
    """onnxruntime turns the quantized Convs into QLinearConv (all but the two stride-2
    downsamplers, which onnxruntime 1.32 leaves as DQ -> Conv) and the attention projections
    into QLinearMatMul; the extra 8-bit output rounding keeps it close to fake-quant."""
    from collections import Counter

    from ptqd.runtime.onnxruntime import create_session

    params = load_params(exported / "calibration")["w8a8"]
    optimized = tmp_path / "optimized.onnx"
    sess = create_session(exported / "onnx" / "unet_w8a8.cpu.onnx", providers=["CPUExecutionProvider"],
                          optimized_path=optimized)
    ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    convs = [l for l in params.layers if builtin_unet.get_submodule(l).__class__.__name__ == "Conv2d"]
    assert ops["QLinearConv"] >= 0.9 * len(convs), (ops["QLinearConv"], len(convs))
    assert ops["QLinearConv"] + ops["Conv"] == len(convs) + 2  # + conv_in, conv_out kept float
    assert ops["QLinearMatMul"] > 0
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(8, 1, 16, 16, generator=gen), torch.linspace(980, 0, 8)
    fp = builtin_unet(x, t).sample.numpy()
    fq = fake_quant_unet(builtin_unet, params)(x, t).sample.numpy()
    got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy()})[0]
    assert np.abs(got - fp).mean() < 2 * np.abs(fq - fp).mean()
