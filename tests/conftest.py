import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ptqd.model import BUILTIN_MODELS


def run_cli(*args: str, entry: str = "ptqd", cwd: Path | None = None, timeout: int = 600):
    """Run an installed console script (ptqd, export-trt) as a user would, in a fresh process."""
    script = Path(sys.executable).parent / entry
    return subprocess.run([str(script), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


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
    from ptqd.model import load_unet

    return load_unet(builtin_source)


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


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A small but complete export-trt run on the built-in model (10 steps, 16 trajectories)."""
    out = tmp_path_factory.mktemp("exp") / "out"
    result = run_cli("--steps", str(EXPORT_STEPS), "--calib-samples", "16", "--output", str(out),
                     entry="export-trt")
    assert result.returncode == 0, result.stderr
    (out.parent / "export-trt.log").write_text(result.stdout)  # beside OUT, not in it
    return out


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
    calibrated on classes 1, 2, 3 at guidance 3, 10 steps, no report."""
    from ptqd.builtin.tiny_pipelines import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-class")
    model = build_tiny_pipeline("class", root / "tiny-ldm")
    out = root / "out"
    result = run_cli("--model", str(model), "--steps", "10", "--guidance-scale", str(GUIDANCE), "--classes", "1,2,3",
                     "--calib-samples", "16", "--no-report", "--output", str(out), entry="export-trt")
    assert result.returncode == 0, result.stderr
    return out
