"""Interrupting a real export (SIGTERM or Ctrl-C) leaves the previous output intact and
nothing half-written; a rerun (after SIGTERM) then completes."""
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

# another seed and size than the session export, so the run recalibrates (same options would be
# "up to date"); small and without a report, so the rerun that must complete stays short
ARGS = ["--steps", "5", "--calib-samples", "8", "--seed", "1", "--weight-rounding", "nearest", "--no-sensitivity",
        "--no-report", "--force"]


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_export_keeps_the_previous_output(exported, tmp_path, sig):
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    before = (out / "manifest.json").read_bytes()
    script = Path(sys.executable).parent / "export-trt"
    # SIGINT as a foreground process gets it: a test run started as a background job inherits
    # SIGINT ignored, and so would the export (the shell's rule for background jobs)
    proc = subprocess.Popen([str(script), *ARGS, "--output", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not _leftovers(tmp_path, "out") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert _leftovers(tmp_path, "out"), "the export never started staging"
    time.sleep(2)  # well inside calibration
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in stderr
    assert (out / "manifest.json").read_bytes() == before
    assert _leftovers(tmp_path, "out") == []
    assert run_cli("verify", str(out)).returncode == 0
    if sig != signal.SIGTERM:
        return  # how the run ended does not matter to the rerun: one full rerun is proof enough
    rerun = run_cli(*ARGS, "--output", str(out), entry="export-trt")
    assert rerun.returncode == 0, rerun.stderr
    assert _leftovers(tmp_path, "out") == [] and run_cli("verify", str(out)).returncode == 0
