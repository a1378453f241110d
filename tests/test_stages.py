"""The stages one command at a time, as a user runs them: calibrate, export, build, sample."""
import json

import numpy as np

from ptqd.output import file_sha256
from tests.conftest import assert_user_error, run_cli


def test_calibrate_then_export_then_build_then_sample(tmp_path):
    out = tmp_path / "out"
    # the stages' mechanics: nearest rounding and no sensitivity map keep the calibration short
    assert run_cli("calibrate", "--steps", "5", "--calib-samples", "8", "--weight-rounding", "nearest",
                   "--no-sensitivity", "--output", str(out)).returncode == 0
    assert not (out / "onnx").exists()
    r = run_cli("export", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "onnx" / "unet_w4a8.onnx").is_file() and (out / "scheduler" / "ptqd_schedule.json").is_file()
    before = (out / "onnx" / "unet_w4a8.onnx").read_bytes()
    assert_user_error(run_cli("export", str(out)), "--force")
    assert (out / "onnx" / "unet_w4a8.onnx").read_bytes() == before
    r = run_cli("build", str(out), "--backend", "onnxruntime", "--batch", "1,2,4")
    assert r.returncode == 0, r.stderr
    engines = json.loads((out / "engines" / "onnxruntime.json").read_text())
    assert engines["batch_profile"] == "1,2,4"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"calibrate", "export", "engines-onnxruntime"} <= set(manifest["stages"])
    listed = {a["path"]: a["sha256"] for a in manifest["artifacts"]}
    assert listed["onnx/unet_w4a8.onnx"] == file_sha256(out / "onnx" / "unet_w4a8.onnx")
    assert "engines/build_engines.sh" in listed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging leftovers
    r = run_cli("sample", str(out), "--backend", "onnxruntime", "--num", "3", "--output", str(tmp_path / "s.npy"))
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "s.npy").shape == (3, 1, 16, 16)
