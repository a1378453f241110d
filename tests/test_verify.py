"""`ptqd verify OUT` passes on a fresh output and names the file after any tampering."""
import json

from tests.conftest import run_cli


def test_fresh_output_verifies(exported_copy):
    result = run_cli("verify", str(exported_copy))
    assert result.returncode == 0, result.stdout
    assert "matches manifest.json" in result.stdout


def test_one_flipped_byte_in_an_onnx_file_is_named(exported_copy):
    path = exported_copy / "onnx" / "unet_w4a8.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = run_cli("verify", str(exported_copy))
    assert result.returncode == 1
    assert "onnx/unet_w4a8.onnx: sha256 differs" in result.stdout
    assert result.stdout.count("\n") == 1  # nothing else is blamed


def test_one_changed_number_in_ptqd_json_is_named(exported_copy):
    path = exported_copy / "calibration" / "ptqd.json"
    doc = json.loads(path.read_text())
    doc["steps"][3]["k"] += 0.01
    path.write_text(json.dumps(doc, indent=1) + "\n")
    result = run_cli("verify", str(exported_copy))
    assert result.returncode == 1
    assert "calibration/ptqd.json: " in result.stdout
    assert "scheduler/ptqd_schedule.json: step 3 k" in result.stdout  # the stages disagree too


def test_missing_and_unlisted_files_are_named(exported_copy):
    (exported_copy / "onnx" / "precision_plan.json").unlink()
    (exported_copy / "onnx" / "extra.onnx").write_bytes(b"x")
    result = run_cli("verify", str(exported_copy))
    assert result.returncode == 1
    assert "onnx/precision_plan.json: missing" in result.stdout
    assert "onnx/extra.onnx: not in the manifest" in result.stdout


def test_not_an_output_is_a_one_line_error(tmp_path):
    result = run_cli("verify", str(tmp_path))
    assert result.returncode == 1 and "has no manifest.json" in result.stderr
    assert "Traceback" not in result.stderr
