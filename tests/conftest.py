import shutil
from pathlib import Path

import pytest

from ptqd.model import BUILTIN_MODELS
from tests import forked_cli


def run_cli(*args: str, entry: str = "ptqd", cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run a console script (ptqd, export-trt) as a user would, in a fresh process (forked from
    one that has imported torch and diffusers already: tests/forked_cli.py)."""
    return forked_cli.run(entry, list(args), cwd=cwd, timeout=timeout, env=env)


def assert_user_error(result, *fragments: str) -> None:
    """Non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def builtin_source():
    from ptqd.model import resolve_model

    return resolve_model("digits")


@pytest.fixture(scope="session")
def builtin_unet(builtin_source):
    from ptqd.model import load_denoiser

    return load_denoiser(builtin_source)


@pytest.fixture(scope="session")
def builtin_scheduler_config(builtin_source):
    from ptqd.model import load_scheduler_config

    return load_scheduler_config(builtin_source)


@pytest.fixture()
def model_copy(tmp_path):
    """A writable copy of the built-in model as a diffusers pipeline folder."""
    dst = tmp_path / "model"
    shutil.copytree(BUILTIN_MODELS["digits"], dst)
    return dst


EXPORT_STEPS = 10
# the session export's options; a rerun with them is "up to date" (tests/test_resume.py)
EXPORT_ARGS = ("--steps", str(EXPORT_STEPS), "--calib-samples", "16", "--report-samples", "64")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A small but complete export-trt run on the built-in model (10 steps, 16 trajectories,
    a report on 64 samples per variant)."""
    out = tmp_path_factory.mktemp("exp") / "out"
    result = run_cli(*EXPORT_ARGS, "--output", str(out), entry="export-trt")
    assert result.returncode == 0, result.stderr
    (out.parent / "export-trt.log").write_text(result.stdout)  # beside OUT, not in it
    return out


@pytest.fixture(scope="session")
def fp8_calibrated(tmp_path_factory):
    """FP8 as the base configuration, with w4a8, w8a8 and the float engine (fp16) beside it,
    scheduled by estimated latency on an L40S (5 steps, 8 trajectories), then exported:
    (OUT, the calibration's printed summary)."""
    out = tmp_path_factory.mktemp("fp8") / "out"
    result = run_cli("calibrate", "--format", "fp8", "--configs", "w4a8,w8a8,fp16", "--steps", "5",
                     "--calib-samples", "8", "--mixed-precision", "latency:1.2", "--target-gpu", "l40s",
                     "--no-sensitivity", "--output", str(out))
    assert result.returncode == 0, result.stderr
    exported = run_cli("export", str(out))
    assert exported.returncode == 0, exported.stderr
    return out, result.stdout


@pytest.fixture()
def exported_copy(exported, tmp_path):
    """A writable copy of the session's export, for tests that damage it."""
    dst = tmp_path / "out"
    shutil.copytree(exported, dst)
    return dst


CONDITIONAL_STEPS = 20
GUIDANCE = 3.0


@pytest.fixture(scope="session")
def tiny_text_export(tmp_path_factory):
    """The issue's command on a tiny random-weight Stable Diffusion layout built in code:
    export-trt --model <it> --bits 4 --steps 20 --guidance-scale 3 (16 trajectories, a
    16-sample report)."""
    from ptqd.builtin.tiny_pipelines import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-text")
    model = build_tiny_pipeline("text", root / "tiny-sd")
    out = root / "out"
    result = run_cli("--model", str(model), "--bits", "4", "--steps", str(CONDITIONAL_STEPS), "--guidance-scale",
                     str(GUIDANCE), "--calib-samples", "16", "--report-samples", "16", "--output", str(out),
                     entry="export-trt")
    assert result.returncode == 0, result.stderr
    (root / "export-trt.log").write_text(result.stdout)
    return out


@pytest.fixture(scope="session")
def tiny_class_export(tmp_path_factory):
    """A tiny class-conditional latent model (UNet2DModel with class embeddings + VAE),
    calibrated on classes 1, 2, 3 at guidance 3, 10 steps, no report, no sensitivity map (the
    text export measures a guided one)."""
    from ptqd.builtin.tiny_pipelines import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-class")
    model = build_tiny_pipeline("class", root / "tiny-ldm")
    out = root / "out"
    result = run_cli("--model", str(model), "--steps", "10", "--guidance-scale", str(GUIDANCE), "--classes", "1,2,3",
                     "--calib-samples", "16", "--no-report", "--no-sensitivity", "--output", str(out),
                     entry="export-trt")
    assert result.returncode == 0, result.stderr
    return out


FAMILY_STEPS = 10


def _family_export(tmp_path_factory, kind: str, *extra: str) -> Path:
    """The issue's command on a tiny random-weight pipeline of one model family, built in code
    with diffusers' own pipeline classes: export-trt --model <it> --bits 4 --steps 10 (8
    trajectories, no report, no sensitivity map: the digits and text exports measure those)."""
    from ptqd.builtin.tiny_pipelines import build_tiny_pipeline

    root = tmp_path_factory.mktemp(f"tiny-{kind}")
    model = build_tiny_pipeline(kind, root / f"tiny-{kind}")
    out = root / "out"
    result = run_cli("--model", str(model), "--bits", "4", "--steps", str(FAMILY_STEPS), "--calib-samples", "8",
                     "--no-report", "--no-sensitivity", *extra, "--output", str(out), entry="export-trt")
    assert result.returncode == 0, result.stderr
    (root / "export-trt.log").write_text(result.stdout)
    return out


@pytest.fixture(scope="session")
def tiny_sdxl_export(tmp_path_factory):
    return _family_export(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_dit_export(tmp_path_factory):
    """DiT with every configuration ptqd has beside the base w4a8 and w8a8: the 4-bit activation
    grid, FP8 and the float engine."""
    return _family_export(tmp_path_factory, "dit", "--classes", "1,2,3,500", "--configs", "w4a4,fp8,fp16")


@pytest.fixture(scope="session")
def tiny_pixart_export(tmp_path_factory):
    return _family_export(tmp_path_factory, "pixart")
