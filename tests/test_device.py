"""--device: where torch runs. This machine's torch is CPU-only, so CUDA is refused in one line
before anything is loaded or written, and `--device cpu` is what the default run computes."""
import json

import pytest
import torch

from tests.conftest import EXPORT_ARGS, assert_user_error, run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA GPU here: --device cuda is valid")
@pytest.mark.parametrize("command", [
    ("calibrate", "--device", "cuda"), ("--device", "cuda:0"), ("sample", "--device", "cuda", "--num", "1"),
])
def test_cuda_without_a_gpu_is_one_line_and_writes_nothing(tmp_path, command):
    target = tmp_path / "out"
    entry = "export-trt" if command[0].startswith("--") else "ptqd"
    result = run_cli(*command, "--output", str(target), entry=entry)
    assert_user_error(result, "--device cuda", "no CUDA GPU", "--device cpu")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_device_cpu_calibrates_exactly_what_the_default_run_does(exported, tmp_path):
    """The session export ran with the default --device (auto: the CPU here); the same
    calibration asked for on the CPU explicitly has the same parameters to the byte and the
    same statistics and schedule."""
    out = tmp_path / "out"
    args = EXPORT_ARGS[:EXPORT_ARGS.index("--report-samples")]   # the calibration's options
    result = run_cli("calibrate", *args, "--device", "cpu", "--output", str(out))
    assert result.returncode == 0, result.stderr
    ours, theirs = out / "calibration", exported / "calibration"
    for name in ("quant_params.safetensors", "quant_params.json", "sensitivity.json"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    a, b = (json.loads((d / "ptqd.json").read_text()) for d in (ours, theirs))
    a.pop("calibration_seconds"), b.pop("calibration_seconds")
    a["weight_rounding"].pop("seconds"), b["weight_rounding"].pop("seconds")
    assert a == b
