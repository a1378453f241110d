"""`ptqd calibrate` on the built-in model: the artifacts other stages and users rely on."""
import json
import math

import numpy as np
import pytest

from tests.conftest import assert_user_error, run_cli

STEPS = 10


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "out"
    result = run_cli("calibrate", "--steps", str(STEPS), "--calib-samples", "16", "--eta", "1",
                     "--configs", "w4a4", "--no-sensitivity", "--output", str(out))
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_ptqd_json_follows_the_architecture_contract(calibrated):
    out, _ = calibrated
    doc = json.loads((out / "calibration" / "ptqd.json").read_text())
    assert doc["num_inference_steps"] == STEPS and doc["eta"] == 1.0
    assert set(doc["configs"]) == {"w4a8", "w8a8", "w4a4"}
    assert doc["configs"]["w4a4"]["weight_bits"] == 4 and doc["configs"]["w4a4"]["act_bits"] == 4
    assert len(doc["model_sha256"]) == 64
    timesteps = [s["timestep"] for s in doc["steps"]]
    assert timesteps == sorted(timesteps, reverse=True) and len(timesteps) == STEPS
    for step in doc["steps"]:
        assert step["config"] in doc["configs"]
        assert len(step["bias"]) == 1 and math.isfinite(step["k"]) and step["sigma_q"] > 0
    for cfg, per_step in doc["stats"].items():
        assert len(per_step) == STEPS
        # kept layers are the default set and recorded
        assert "conv_in" in doc["configs"][cfg]["kept_layers"]
    mp = doc["mixed_precision"]
    assert sum(mp["counts"].values()) == STEPS and mp["saving_vs_fp32"] > 1
    # lower-precision configurations are noisier on average
    snr = {c: np.mean([s["snr_db"] for s in v]) for c, v in doc["stats"].items()}
    assert snr["w8a8"] > snr["w4a8"] > snr["w4a4"]


def test_summary_table_is_printed(calibrated):
    _, stdout = calibrated
    assert "w4a8" in stdout and "schedule (budget:1.25)" in stdout and "fewer than FP32" in stdout


def test_recalibrating_needs_force_and_leaves_results_untouched(calibrated):
    out, _ = calibrated
    before = (out / "calibration" / "ptqd.json").read_bytes()
    assert_user_error(run_cli("calibrate", "--steps", "5", "--output", str(out)), "--force")
    assert (out / "calibration" / "ptqd.json").read_bytes() == before


def test_sampling_the_output_with_and_without_correction(calibrated, tmp_path):
    out, _ = calibrated
    files = {}
    variants = {"ptqd": ["--precision", "w4a8"], "naive": ["--precision", "w4a8", "--no-correction"],
                "fp": ["--precision", "fp32"]}
    for name, extra in variants.items():
        files[name] = tmp_path / f"{name}.npy"
        r = run_cli("sample", str(out), "--num", "4", "--output", str(files[name]), *extra)
        assert r.returncode == 0, r.stderr
    a, b, fp = (np.load(files[n]) for n in ("ptqd", "naive", "fp"))
    assert a.shape == b.shape == fp.shape == (4, 1, 16, 16)
    assert not np.array_equal(a, b)


def test_sample_refuses_what_the_output_does_not_hold(calibrated, tmp_path):
    out, _ = calibrated
    target = str(tmp_path / "x.npy")
    assert_user_error(run_cli("sample", str(out), "--precision", "w8a4", "--output", target), "w8a4")
    assert_user_error(run_cli("sample", str(out), "--steps", "50", "--output", target), "calibrated for")


@pytest.mark.parametrize("args, fragment", [
    (["--bits", "3"], "not supported"), (["--bits", "8", "--act-bits", "16"], "not supported"),
    (["--format", "nvfp4", "--target-gpu", "h100"], "no FP4 tensor cores"),
    (["--mixed-precision", "fast"], "--mixed-precision"), (["--calib-samples", "2"], "too few"),
    (["--correction", "magic"], "--correction"), (["--target-gpu", "v100"], "--target-gpu"),
    (["--mixed-precision", "latency:0.5"], "latency ratio"), (["--weight-rounding", "round"], "--weight-rounding"),
    (["--format", "fp8", "--bits", "4"], "--format fp8"), (["--configs", "fp4"], "not a configuration"),
    (["--configs", "fp8", "--target-gpu", "a100"], "no FP8 tensor cores"), (["--calib-batch", "0"], "--calib-batch"),
    (["--device", "tpu"], "--device"),
])
def test_bad_calibration_options(tmp_path, args, fragment):
    assert_user_error(run_cli("calibrate", *args, "--output", str(tmp_path / "o")), fragment)
    assert not (tmp_path / "o").exists()


def test_latency_policy_prices_the_schedule_on_the_target_gpu(fp8_calibrated):
    """On an L40S w4a8, w8a8 and fp8 run at the same tensor-core rate: at equal estimated
    latency the DP weighs only their noise, and the float engine (fp16) takes exactly as
    many steps as the latency budget affords (its steps add no leftover noise). The summary
    gives latency beside BOPs, labelled estimated."""
    out, stdout = fp8_calibrated
    doc = json.loads((out / "calibration" / "ptqd.json").read_text())
    lat, ms = doc["latency"], doc["latency"]["ms_per_step"]
    assert doc["base_config"] == "fp8"
    assert lat["kind"] == "estimated" and lat["target_gpu"] == "L40S"
    assert set(ms) == {"fp16", "w4a8", "w8a8", "fp8"}
    assert ms["w8a8"] < ms["fp16"]
    assert doc["configs"]["fp16"]["format"] == "fp16" and doc["configs"]["fp8"]["format"] == "fp8"
    assert all(s["sigma_q"] == 0 and s["k"] == 0 for s in doc["stats"]["fp16"])
    fastest, steps = min(ms.values()), doc["num_inference_steps"]
    afforded = int((1.2 * fastest * steps - fastest * steps) / (ms["fp16"] - fastest) + 1e-9)
    assert afforded >= 1  # the float engine is in reach at this ratio, or the test proves nothing
    schedule = [s["config"] for s in doc["steps"]]
    assert schedule.count("fp16") == afforded, schedule
    assert ms["w4a8"] == ms["w8a8"] == ms["fp8"]   # the same kernels' rate and bytes: exactly equal
    assert lat["schedule_ms"] <= 1.2 * fastest * steps
    assert lat["speedup_vs_fp16"] == pytest.approx(lat["fp16_schedule_ms"] / lat["schedule_ms"])
    assert "latency per step on L40S (estimated, batch 1)" in stdout
    assert "faster than all-FP16" in stdout
    assert "float engine, no quantization noise" in stdout
