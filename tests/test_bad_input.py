"""Bad input (issue 8's list, where not tested beside its feature): exit code, one line,
no traceback, output untouched."""
import json
import subprocess
import sys

import pytest

from tests.conftest import assert_user_error, run_cli


def _snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, fragment", [
    (["--steps", "0"], "--steps"), (["--steps", "100000"], "--steps"), (["--eta", "-0.5"], "--eta"),
    (["--bits", "2"], "not supported"), (["--act-bits", "3"], "not supported"),
])
def test_bad_export_options(tmp_path, args, fragment):
    assert_user_error(run_cli(*args, "--output", str(tmp_path / "o"), entry="export-trt"), fragment)
    assert not (tmp_path / "o").exists()


def test_output_path_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert_user_error(run_cli("--output", str(target), entry="export-trt"), "is a file")
    assert target.read_text() == "keep me"


def test_not_a_diffusers_model_and_corrupted_weights(tmp_path, model_copy):
    (tmp_path / "empty").mkdir()
    assert_user_error(run_cli("--model", str(tmp_path / "empty"), "--output", str(tmp_path / "o"),
                              entry="export-trt"), "not a diffusers model")
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    assert_user_error(run_cli("--model", str(model_copy), "--output", str(tmp_path / "o"),
                              entry="export-trt"), "cannot load UNet weights")
    assert not (tmp_path / "o").exists()


def test_calibration_from_a_model_that_changed_is_refused(tmp_path, model_copy):
    out = tmp_path / "out"
    assert run_cli("calibrate", "--model", str(model_copy), "--steps", "4", "--calib-samples", "8",
                   "--weight-rounding", "nearest", "--no-sensitivity", "--output", str(out)).returncode == 0
    config = model_copy / "scheduler" / "scheduler_config.json"
    doc = json.loads(config.read_text())
    doc["beta_end"] = 0.021
    config.write_text(json.dumps(doc))
    before = _snapshot(out)
    assert_user_error(run_cli("export", str(out)), "another model")
    assert_user_error(run_cli("sample", str(out), "--output", str(tmp_path / "s.npy")), "has changed")
    assert _snapshot(out) == before


def test_non_finite_statistics_are_refused(exported_copy, tmp_path):
    path = exported_copy / "calibration" / "ptqd.json"
    path.write_text(path.read_text().replace('"sigma_q": ', '"sigma_q": NaN, "x": ', 1))
    assert_user_error(run_cli("sample", str(exported_copy), "--output", str(tmp_path / "s.npy")), "non-finite")


def test_truncated_onnx_and_calibration_files(exported_copy, tmp_path):
    graph = exported_copy / "onnx" / "unet_w4a8.cpu.onnx"
    graph.write_bytes(graph.read_bytes()[:5000])
    assert_user_error(run_cli("sample", str(exported_copy), "--backend", "onnxruntime", "--output",
                              str(tmp_path / "a.npy")), "does not load in onnxruntime", "ptqd verify")
    params = exported_copy / "calibration" / "quant_params.safetensors"
    params.write_bytes(params.read_bytes()[:100])
    assert_user_error(run_cli("sample", str(exported_copy), "--backend", "torch", "--output",
                              str(tmp_path / "b.npy")), "quantization parameters do not load")
    assert not (tmp_path / "a.npy").exists() and not (tmp_path / "b.npy").exists()


def test_batch_outside_the_engine_profile(exported_copy, tmp_path):
    # the fixture's engines were built for --batch 1,4,8
    assert_user_error(run_cli("sample", str(exported_copy), "--backend", "onnxruntime", "--num", "16",
                              "--batch-size", "16", "--output", str(tmp_path / "s.npy")), "profile 1..8")


@pytest.mark.parametrize("entry, args", [
    ("main", ["calibrate", "--bits", "3"]), ("export_trt_main", ["--mixed-precision", "fast"]),
    ("main", ["sample", "--cuda-graph"]),
])
def test_bad_options_are_refused_before_torch_is_imported_real_process(tmp_path, entry, args):
    """In a fresh interpreter (not tests/forked_cli.py's warm one): a mistyped option is refused
    without importing torch, i.e. in a fraction of a second instead of ~4 s here."""
    code = ("import sys\nfrom ptqd.cli import " + entry + "\ntry:\n    " + entry + "(sys.argv[1:])\n"
            "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, *args, "--output", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["1", "False"], result.stdout + result.stderr
    assert not (tmp_path / "o").exists()
