"""The report export-trt writes by default: its numbers are what `ptqd sample` and the
metric code give by hand, the page is self-contained, and export-trt prints the headline."""
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from ptqd.evaluation.metrics import DigitFeatures, frechet_distance, per_sample_error, real_digit_features
from ptqd.model import resolve_model
from tests.conftest import EXPORT_ARGS, EXPORT_STEPS, assert_user_error, run_cli

REPORT_SAMPLES = int(EXPORT_ARGS[EXPORT_ARGS.index("--report-samples") + 1])

VARIANTS = {"fp32", "w4a8", "w4a8+ptqd", "w8a8", "w8a8+ptqd", "mixed", "mixed+ptqd"}


@pytest.fixture(scope="module")
def metrics(exported):
    return json.loads((exported / "report" / "metrics.json").read_text())


def _sample(out, tmp_path, name, *flags):
    path = tmp_path / f"{name}.npy"
    result = run_cli("sample", str(out), "--backend", "onnxruntime", "--num", str(REPORT_SAMPLES), "--seed", "0",
                     "--output", str(path), *flags)
    assert result.returncode == 0, result.stderr
    return np.load(path)


def test_report_has_every_variant_step_and_cost(metrics):
    assert set(metrics["variants"]) == VARIANTS
    assert metrics["samples"] == REPORT_SAMPLES and len(metrics["steps"]) == EXPORT_STEPS
    for step in metrics["steps"]:
        assert step["config"] in {"w4a8", "w8a8"}
        assert {"k", "bias_abs", "sigma_q", "snr_before_db", "snr_after_db",
                "latent_mse_mixed", "latent_mse_mixed+ptqd"} <= set(step)
    assert metrics["bops"]["saving_vs_fp32"] > 4  # 4-/8-bit vs 32-bit
    assert metrics["sizes"]["fp32_onnx"] > 3 * metrics["sizes"]["graphs"]["w4a8"]["onnxruntime"]
    assert metrics["sizes"]["model_weights"] > metrics["sizes"]["graphs"]["w4a8"]["tensorrt"]
    assert "not built" in metrics["engines"]["tensorrt"]  # no TensorRT here, and the report says so
    # the correction pulls the deployed schedule's samples towards FP32. (All-w4a8 is no promise
    # at this calibration's size, 16 trajectories over 10 steps: measured on the 2-core machine on
    # 2026-12-06, with this commit's code and the one before it alike, w4a8 2.34e-4 -> 3.17e-4
    # with the correction, the mixed schedule 1.08e-4 -> 9.76e-5)
    assert metrics["variants"]["mixed+ptqd"]["mse"] < metrics["variants"]["mixed"]["mse"]


def test_report_numbers_equal_ptqd_sample_and_hand_metrics(exported, metrics, tmp_path):
    fp = _sample(exported, tmp_path, "fp", "--precision", "fp32")
    checks = {"w4a8": ("--precision", "w4a8", "--no-correction"), "mixed+ptqd": ()}
    features = DigitFeatures(resolve_model("digits").extras_dir)
    real = real_digit_features(features)
    for name, flags in checks.items():
        images = _sample(exported, tmp_path, name.replace("+", "_"), *flags)
        row = metrics["variants"][name]
        by_hand = per_sample_error(images, fp)
        assert row["mse"] == pytest.approx(by_hand["mse"], rel=1e-9)
        assert row["psnr_db"] == pytest.approx(by_hand["psnr_db"], rel=1e-9)
        assert row["frechet_distance"] == pytest.approx(frechet_distance(features(images), real), rel=1e-6)
    assert metrics["variants"]["fp32"]["frechet_distance"] == pytest.approx(
        frechet_distance(features(fp), real), rel=1e-6)


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.external = [], []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href") and value:
                (self.images if value.startswith("data:image/png;base64,") else self.external).append(value)


def test_report_page_is_self_contained(exported, metrics):
    page = (exported / "report" / "report.html").read_text()
    refs = _Refs()
    refs.feed(page)
    assert len(refs.images) == 5 and refs.external == []
    for name in ("noise_statistics", "snr", "schedule", "step_error", "samples"):
        assert (exported / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["headline"]["quality"] in page.replace("&#x27;", "'")


def test_export_trt_prints_the_report_and_three_numbers(exported):
    log = (exported.parent / "export-trt.log").read_text()
    assert f"report: {exported}/report/report.html" in log
    assert re.search(r"quality: FD [\d.]+ with PTQD vs [\d.]+ FP32", log)
    assert re.search(r"compute: [\d.]+x fewer BOPs than FP32", log)
    assert re.search(r"size: +[\d.]+x smaller", log)


def test_report_command_refuses_to_overwrite_and_rewrites_with_force(exported_copy):
    assert_user_error(run_cli("report", str(exported_copy)), "report exists", "--force")
    result = run_cli("report", str(exported_copy), "--num", "16", "--force")
    assert result.returncode == 0, result.stderr
    assert json.loads((exported_copy / "report" / "metrics.json").read_text())["samples"] == 16
    assert run_cli("verify", str(exported_copy)).returncode == 0
