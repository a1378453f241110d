"""OUT/engines/build_engines.sh: the exact trtexec commands that build this output's engines
in NVIDIA's TensorRT container, for machines (like ours) where TensorRT cannot be installed."""
from __future__ import annotations

import shlex
from pathlib import Path

from ptqd.engines.release import TENSORRT_IMAGE
from ptqd.engines.jobs import EngineJob
from ptqd.engines.tensorrt import BuildSettings

SCRIPT_NAME = "build_engines.sh"
TIMING_CACHE = "engines/timing.cache"


def _shape_arg(shapes: dict, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in per[which])}" for name, per in shapes.items())


def trtexec_command(job: EngineJob, settings: BuildSettings) -> list[str]:
    shapes = job.shapes
    return ["trtexec", f"--onnx=onnx/{job.onnx.name}", f"--saveEngine=engines/{job.plan_name}",
            # strongly typed: precision comes from the graph's Q/DQ (TensorRT 11 has no other
            # way; on 11 the flag is accepted as a no-op)
            "--stronglyTyped",
            f"--minShapes={_shape_arg(shapes, 0)}", f"--optShapes={_shape_arg(shapes, 1)}",
            f"--maxShapes={_shape_arg(shapes, 2)}", f"--timingCacheFile={TIMING_CACHE}",
            f"--builderOptimizationLevel={settings.optimization_level}",
            f"--memPoolSize=workspace:{settings.workspace_mib}", "--skipInference"]


SCRIPT_HEAD = '''#!/usr/bin/env bash
# Builds the TensorRT engines of this ptqd output. Written by ptqd because TensorRT was not
# available where the output was made. Run it from the output directory inside NVIDIA's
# TensorRT container of the release the Triton image uses:
#
#   docker run --rm --gpus all -v "$PWD":/out -w /out {image} bash engines/{script}
#
# An engine runs only with the TensorRT version and GPU architecture that built it; the
# metadata written beside each plan records both.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v trtexec >/dev/null || {{ echo "trtexec not found: run this inside {image}" >&2; exit 1; }}

write_metadata() {{  # name config source-onnx batch-profile optimization-level
  local trt gpu cc
  trt=$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || echo unknown)
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || echo unknown)
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 || echo unknown)
  printf '{{"format_version": 1, "config": "%s", "tensorrt_version": "%s", "gpu": {{"name": "%s", "compute_capability": "%s"}}, "source_onnx": "%s", "source_onnx_sha256": "%s", "batch_profile": "%s", "builder_optimization_level": %s, "strongly_typed": true, "built_by": "build_engines.sh"}}\\n' \\
    "$2" "$trt" "$gpu" "$cc" "$3" "$(sha256sum "onnx/$3" | cut -d' ' -f1)" "$4" "$5" \\
    > "engines/$1.json"
}}
'''


def build_script(jobs: list[EngineJob], settings: BuildSettings) -> str:
    lines = [SCRIPT_HEAD.format(image=TENSORRT_IMAGE, script=SCRIPT_NAME)]
    for job in jobs:
        lines.append(f"# {job.note}")
        cmd = trtexec_command(job, settings)
        lines.append(" \\\n  ".join(shlex.quote(part) for part in cmd))
        # engines/<name>.json beside the plan, as the Python builder writes it
        args = (job.name, job.config, job.onnx.name, str(settings.profile))
        lines.append("write_metadata " + " ".join(shlex.quote(a) for a in args) + f" {settings.optimization_level}")
        lines.append(f'echo "built engines/{job.plan_name}"\n')
    return "\n".join(lines)


def write_build_script(engines_dir: Path, jobs: list[EngineJob], settings: BuildSettings) -> Path:
    engines_dir.mkdir(parents=True, exist_ok=True)
    path = engines_dir / SCRIPT_NAME
    path.write_text(build_script(jobs, settings))
    path.chmod(0o755)
    return path
