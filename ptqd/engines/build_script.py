"""OUT/engines/build_engines.sh: the exact trtexec commands that build this output's engines
in NVIDIA's TensorRT container, for machines (like ours) where TensorRT cannot be installed.

After building, the script checks every plan against ONNX Runtime on the same inputs
(Polygraphy) and times it at its profile's opt batch (trtexec), writing
engines/<plan stem>.timing.json (ptqd/engines/timing.py reads it back).
"""
from __future__ import annotations

import math
import shlex
from pathlib import Path

import onnx

from ptqd.engines.jobs import EngineJob
from ptqd.engines.release import TENSORRT_IMAGE
from ptqd.engines.tensorrt import BuildSettings
from ptqd.runtime.formats import min_compute_capability
from ptqd.runtime.layout import TIMING_FILE, graph_files

# why a plan needs a newer GPU, by the compute capability its kernels need
GPU_NEEDS = {8.9: "FP8 tensor cores: Ada, Hopper or Blackwell",
             10.0: "NVFP4 tensor cores: Blackwell, TensorRT >= 10.8"}

SCRIPT_NAME = "build_engines.sh"
TIMING_CACHE = "engines/timing.cache"
CHECK_DIR = "engines/.check"   # hidden: scratch, not an artifact of OUT (ptqd.output.is_artifact)

# Polygraphy's pass rule for one output: the 99th percentile of |plan - reference| within ATOL
# (or of the relative error within RTOL). Measured with ONNX Runtime and torch on the built-in
# model (batch 4, these value ranges; eps has unit variance): correct implementations of one
# quantized graph differ because activations near a rounding boundary land on the neighbouring
# integer: the torch fake-quant model vs the reference graph, 99th percentile 0.008-0.020 in
# FP32, 0.019-0.021 in FP16, 0.024-0.025 in bfloat16 (max 0.010-0.039, hence a percentile and
# not the max). Mistakes measured against the same reference: the other configuration's graph
# 0.094, one convolution's weight scale doubled 0.109; both fail at 0.05. The FP16 VAE decoder
# vs its FP32 graph: 0.0006. A doubled activation scale of one layer (0.015) passes: the check
# catches broken plans, not small drifts of one scale.
CHECK_QUANTILE = 0.99
CHECK_ATOL = 0.05
CHECK_RTOL = 0.05
FLOAT_RANGE = (-2.0, 2.0)      # sample, latents, encoder_hidden_states: about unit variance
TIMESTEP_RANGE = (0, 999)      # diffusers schedulers' 1000 training timesteps
# ops that pass an index tensor through unchanged on its way to the embedding Gather
_INDEX_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


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


def reference_graph(job: EngineJob) -> Path:
    """What a plan is checked against (EngineJob.reference_onnx); the graph TensorRT built
    where no such twin was exported."""
    ref = job.reference_onnx or job.cpu_onnx
    return ref if ref.is_file() else job.onnx


def _embedding_rows(graph: onnx.GraphProto, name: str) -> int | None:
    """Rows of the table an integer input indexes (class embedding, token embedding)."""
    tables = {t.name: t.dims for t in graph.initializer}
    frontier, seen = [name], set()
    while frontier:
        tensor = frontier.pop()
        seen.add(tensor)
        for node in graph.node:
            if node.op_type == "Gather" and node.input[1:2] == [tensor] and node.input[0] in tables:
                return int(tables[node.input[0]][0])
            if node.op_type in _INDEX_PASS_THROUGH and node.input[:1] == [tensor]:
                frontier += [o for o in node.output if o not in seen]
    return None


def _embedding_sizes(graph: onnx.GraphProto) -> dict[str, int]:
    sizes = {}
    for inp in graph.input:
        if inp.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            rows = _embedding_rows(graph, inp.name)
            if rows is not None:
                sizes[inp.name] = rows
    return sizes


def embedding_sizes(onnx_path: Path) -> dict[str, int]:
    """Per integer input that indexes an embedding table (class labels, token ids): the
    table's rows, the indices the graph can take (an out-of-range index is an error in ONNX
    Runtime and undefined in TensorRT)."""
    return _embedding_sizes(onnx.load(str(onnx_path), load_external_data=False).graph)


def value_ranges(onnx_path: Path) -> dict[str, tuple]:
    """Per input, the range Polygraphy draws values from: integer inputs stay valid indices
    (an integer input that indexes no table gets 0)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    sizes = _embedding_sizes(graph)
    ranges = {}
    for inp in graph.input:
        if inp.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            ranges[inp.name] = (0, sizes.get(inp.name, 1) - 1)
        else:
            ranges[inp.name] = TIMESTEP_RANGE if inp.name == "timestep" else FLOAT_RANGE
    return ranges


def check_arguments(job: EngineJob) -> list[str]:
    """check_plan's arguments: plan stem, reference graph, opt input shapes, value ranges."""
    ref = reference_graph(job)
    shapes = " ".join(f"{n}:[{','.join(str(d) for d in per[1])}]" for n, per in job.shapes.items())
    ranges = " ".join(f"{n}:[{lo},{hi}]" for n, (lo, hi) in value_ranges(ref).items() if n in job.shapes)
    return [job.name, ref.name, shapes, ranges]


INT_BYTES = {onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4}


def timing_arguments(job: EngineJob) -> list[str]:
    """time_plan's arguments: plan stem, configuration, opt batch, trtexec --shapes, and the
    integer inputs as name:bytes at the opt shape. trtexec fills inputs it is not given with
    random values, for integers in [-128, 127]: out-of-range class or token indices, undefined
    in TensorRT; time_plan feeds those inputs zeros (a valid index) instead."""
    graph = onnx.load(str(job.onnx), load_external_data=False).graph
    ints = []
    for inp in graph.input:
        size = INT_BYTES.get(inp.type.tensor_type.elem_type)
        if size and inp.name in job.shapes:
            ints.append(f"{inp.name}:{size * math.prod(job.shapes[inp.name][1])}")
    return [job.name, job.config, str(next(iter(job.shapes.values()))[1][0]), _shape_arg(job.shapes, 1),
            " ".join(ints)]


# Placeholders are @NAME@ so that bash's own braces and dollars need no escaping.
SCRIPT_HEAD = r'''#!/usr/bin/env bash
# Builds the TensorRT engines of this ptqd output, then checks each plan against ONNX Runtime
# on the same inputs (Polygraphy) and times it at its profile's opt batch (trtexec). Written by
# ptqd because TensorRT was not available where the output was made. Run it from the output
# directory inside NVIDIA's TensorRT container of the release the Triton image uses:
#
#   docker run --rm --gpus all -v "$PWD":/out -w /out @IMAGE@ bash -c \
#     'PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q polygraphy onnxruntime && bash engines/@SCRIPT@'
#
# An engine runs only with the TensorRT version and GPU architecture that built it; the
# metadata written beside each plan records both. engines/<plan>.timing.json holds the
# measured latency. Environment: PTQD_SKIP_CHECK=1 builds and times without the check;
# PTQD_CHECK_ATOL / PTQD_CHECK_RTOL change its tolerances (default @ATOL@ / @RTOL@ on the
# @QUANTILE@ quantile of the error); scratch files of the check stay in @CHECK_DIR@.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v trtexec >/dev/null || { echo "trtexec not found: run this inside @IMAGE@" >&2; exit 1; }
SKIP_CHECK=${PTQD_SKIP_CHECK:-0}
ATOL=${PTQD_CHECK_ATOL:-@ATOL@}
RTOL=${PTQD_CHECK_RTOL:-@RTOL@}
if [ "$SKIP_CHECK" != 1 ] && ! { command -v polygraphy >/dev/null && python3 -c 'import onnxruntime, tensorrt' 2>/dev/null; }; then
  echo "polygraphy, onnxruntime and TensorRT's Python module check the plans: PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install polygraphy onnxruntime (or PTQD_SKIP_CHECK=1 to skip the check)" >&2
  exit 1
fi
TRT_VERSION=$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || echo unknown)
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)
GPU_CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 || true)
GPU_NAME=${GPU_NAME:-unknown}
GPU_CC=${GPU_CC:-unknown}
FAILED=()

require_gpu() {  # plan minimum-compute-capability why: refused before anything is built
  if [ "$GPU_CC" != unknown ] && awk -v have="$GPU_CC" -v need="$2" 'BEGIN { exit !(have + 0 < need + 0) }'; then
    echo "engines/$1.plan needs a GPU of compute capability >= $2 ($3); this one is $GPU_NAME ($GPU_CC): build on such a GPU, or export without that configuration" >&2
    exit 1
  fi
}
require() {  # files a graph reads beside it: the weights of a graph past protobuf's 2 GiB
  for f in "$@"; do
    [ -f "$f" ] || { echo "$f is missing: its graph keeps its weights there; copy the whole output directory" >&2; exit 1; }
  done
}
write_metadata() {  # name config source-onnx batch-profile optimization-level
  printf '{"format_version": 1, "config": "%s", "tensorrt_version": "%s", "gpu": {"name": "%s", "compute_capability": "%s"}, "source_onnx": "%s", "source_onnx_sha256": "%s", "batch_profile": "%s", "builder_optimization_level": %s, "strongly_typed": true, "built_by": "build_engines.sh"}\n' \
    "$2" "$TRT_VERSION" "$GPU_NAME" "$GPU_CC" "$3" "$({ cat "onnx/$3"; [ ! -f "onnx/$3.data" ] || cat "onnx/$3.data"; } | sha256sum | cut -d' ' -f1)" "$4" "$5" \
    > "engines/$1.json"
}

check_plan() {  # name reference-onnx "input shapes" "value ranges"
  if [ "$SKIP_CHECK" = 1 ]; then echo "engines/$1.plan: not checked (PTQD_SKIP_CHECK=1)"; return 0; fi
  local dir="@CHECK_DIR@/$1" shapes ranges
  read -r -a shapes <<< "$3"   # one word per input; read does not glob the brackets
  read -r -a ranges <<< "$4"
  mkdir -p "$dir"
  if ! polygraphy run "onnx/$2" --onnxrt --input-shapes "${shapes[@]}" --val-range "${ranges[@]}" --seed 0 \
      --save-inputs "$dir/inputs.json" --save-outputs "$dir/onnxrt.json" > "$dir/onnxrt.log" 2>&1; then
    echo "engines/$1.plan: ONNX Runtime could not run onnx/$2 (see $dir/onnxrt.log)" >&2
    FAILED+=("$1"); return 0
  fi
  if polygraphy run "engines/$1.plan" --model-type engine --trt --load-inputs "$dir/inputs.json" \
      --load-outputs "$dir/onnxrt.json" --validate --check-error-stat quantile \
      --error-quantile @QUANTILE@ --atol "$ATOL" --rtol "$RTOL" > "$dir/check.log" 2>&1; then
    echo "engines/$1.plan matches onnx/$2 (ONNX Runtime): @QUANTILE@ quantile of the error within atol $ATOL or rtol $RTOL"
  else
    grep -E "Required Tolerance|FAILED|NaN|Inf" "$dir/check.log" | tail -n 3 >&2 || true
    echo "engines/$1.plan DIFFERS from onnx/$2 (ONNX Runtime) beyond atol $ATOL / rtol $RTOL (see $dir/check.log)" >&2
    FAILED+=("$1")
  fi
}

time_plan() {  # name config opt-batch trtexec-shapes "integer inputs as name:bytes"
  local log median spec files=() load=() ints
  read -r -a ints <<< "${5:-}"
  for spec in "${ints[@]}"; do   # zeros: a valid class / token index (trtexec's own are random)
    mkdir -p "@CHECK_DIR@"
    head -c "${spec##*:}" /dev/zero > "@CHECK_DIR@/$1.${spec%%:*}.bin"
    files+=("${spec%%:*}:@CHECK_DIR@/$1.${spec%%:*}.bin")
  done
  if [ ${#files[@]} -gt 0 ]; then load=("--loadInputs=$(IFS=,; echo "${files[*]}")"); fi
  # CUDA graph, no host<->device copies: the GPU time of one denoising call, as the sampler's
  # --cuda-graph runs it (TensorRT 11's trtexec does this by default and takes the flags as no-ops)
  if ! log=$(trtexec --loadEngine="engines/$1.plan" --shapes="$4" "${load[@]}" --useCudaGraph --noDataTransfers \
      --useSpinWait 2>&1); then
    printf '%s\n' "$log" | tail -n 5 >&2
    echo "engines/$1.plan: trtexec could not time it" >&2
    FAILED+=("$1"); return 0
  fi
  median=$(printf '%s\n' "$log" | sed -n 's/.*GPU Compute Time: .*median = \([0-9.][0-9.]*\) ms.*/\1/p' | tail -n 1)
  if [ -z "$median" ]; then
    echo "engines/$1.plan: no 'GPU Compute Time ... median' in trtexec's output" >&2
    FAILED+=("$1"); return 0
  fi
  printf '{"format_version": 1, "engine": "%s.plan", "config": "%s", "median_ms": %s, "batch": %s, "measured_by": "trtexec", "tensorrt_version": "%s", "gpu": "%s", "cuda_graph": true}\n' \
    "$1" "$2" "$median" "$3" "$TRT_VERSION" "$GPU_NAME" > "engines/@TIMING_FILE@"
  echo "engines/$1.plan ($2): median $median ms per call at batch $3 on $GPU_NAME (trtexec GPU Compute Time)"
}
'''

SCRIPT_TAIL = r'''
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
'''


def _script_head() -> str:
    values = {"IMAGE": TENSORRT_IMAGE, "SCRIPT": SCRIPT_NAME, "ATOL": str(CHECK_ATOL), "RTOL": str(CHECK_RTOL),
              "QUANTILE": str(CHECK_QUANTILE), "CHECK_DIR": CHECK_DIR,
              "TIMING_FILE": TIMING_FILE.format(name="$1")}
    text = SCRIPT_HEAD
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def _call(function: str, args: list[str]) -> str:
    return " ".join([function, *(shlex.quote(a) for a in args)])


def build_script(jobs: list[EngineJob], settings: BuildSettings) -> str:
    lines = [_script_head()]
    graphs = dict.fromkeys(g for job in jobs for g in (job.onnx, reference_graph(job)))
    companions = [f"onnx/{f.name}" for g in graphs for f in graph_files(g)[1:]]
    if companions:
        lines.append("# external-data files of the graphs (exporter/graph_io.py)")
        lines.append(_call("require", companions) + "\n")
    gated = [(job, min_compute_capability(job.config)) for job in jobs]
    gated = [(job, cc) for job, cc in gated if cc > 0]
    if gated:
        lines.append("# plans whose kernels only newer GPUs have (runtime/formats.py KERNELS)")
        lines += [_call("require_gpu", [job.name, f"{cc:g}", GPU_NEEDS.get(cc, "")])
                  for job, cc in gated]
        lines.append("")
    for job in jobs:
        lines.append(f"# {job.note}")
        cmd = trtexec_command(job, settings)
        lines.append(" \\\n  ".join(shlex.quote(part) for part in cmd))
        # engines/<name>.json beside the plan, as the Python builder writes it
        args = [job.name, job.config, job.onnx.name, str(settings.profile), str(settings.optimization_level)]
        lines.append(_call("write_metadata", args))
        lines.append(f'echo "built engines/{job.plan_name}"\n')
    lines.append("# every plan against ONNX Runtime on the same inputs, then its latency at the opt batch")
    lines += [_call("check_plan", check_arguments(job)) for job in jobs]
    lines += [_call("time_plan", timing_arguments(job)) for job in jobs]
    return "\n".join(lines) + "\n" + SCRIPT_TAIL


def write_build_script(engines_dir: Path, jobs: list[EngineJob], settings: BuildSettings) -> Path:
    engines_dir.mkdir(parents=True, exist_ok=True)
    path = engines_dir / SCRIPT_NAME
    path.write_text(build_script(jobs, settings))
    path.chmod(0o755)
    return path
