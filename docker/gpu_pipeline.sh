#!/usr/bin/env bash
# The GPU path in containers: build the export image, run export-trt on the GPU, wrap the
# resulting Triton model repository in a serving image, and serve it.
#
#   docker/gpu_pipeline.sh release            print the NGC release both images use
#   docker/gpu_pipeline.sh build              build ptqd-build:<release> (context: repository root)
#   docker/gpu_pipeline.sh export [ARGS...]   run export-trt into $OUTDIR/ptqd-out (ARGS replace the default ones)
#   docker/gpu_pipeline.sh serve-image        build ptqd-serve:<release> from $OUTDIR/ptqd-out/triton
#   docker/gpu_pipeline.sh triton-image       build ptqd-triton:<release>, the server without models (Kubernetes)
#   docker/gpu_pipeline.sh serve              run Triton on ports 8000 (HTTP), 8001 (gRPC), 8002 (metrics)
#   docker/gpu_pipeline.sh all [ARGS...]      build, export, serve-image, serve
#
# OUTDIR (default ./docker-out, relative to the current directory) is mounted as /out in the
# export container. The release is read from ptqd/engines/release.py, the only place it is written,
# so the TensorRT image that builds the plans and the Triton image that loads them always match.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RELEASE_FILE="$REPO_ROOT/ptqd/engines/release.py"
OUTDIR="${OUTDIR:-./docker-out}"

die() {
    echo "gpu_pipeline.sh: $*" >&2
    exit 1
}

# NGC_RELEASE = "25.12" -> 25.12 (sed, not Python: the GPU host need not have ptqd installed)
read_release() {
    [[ -f "$RELEASE_FILE" ]] || die "cannot find $RELEASE_FILE"
    local rel
    rel="$(sed -n 's/^NGC_RELEASE[[:space:]]*=[[:space:]]*["'\'']\([^"'\'']*\)["'\''].*/\1/p' "$RELEASE_FILE")"
    [[ "$rel" =~ ^[0-9]+\.[0-9]+$ ]] || die "no NGC_RELEASE = \"YY.MM\" line in $RELEASE_FILE"
    echo "$rel"
}

# The output folder as an absolute path (docker -v needs one), created if missing.
outdir_abs() {
    mkdir -p "$OUTDIR"
    (cd "$OUTDIR" && pwd)
}

cmd_build() {
    docker build -f "$REPO_ROOT/docker/Dockerfile.build" \
        --build-arg "NGC_RELEASE=$REL" -t "ptqd-build:$REL" "$REPO_ROOT"
}

cmd_export() {
    local out
    out="$(outdir_abs)"
    # Run as the calling user so the files under OUTDIR are theirs; HOME points somewhere
    # writable for the caches torch and diffusers keep.
    docker run --rm --gpus all \
        --user "$(id -u):$(id -g)" -e HOME=/tmp \
        -v "$out":/out \
        "ptqd-build:$REL" "$@"
}

cmd_serve_image() {
    local repo
    repo="$(outdir_abs)/ptqd-out/triton"
    [[ -d "$repo" ]] || die "no Triton repository at $repo: run '$0 export' first"
    docker build -f "$REPO_ROOT/docker/Dockerfile.serve" \
        --build-arg "NGC_RELEASE=$REL" -t "ptqd-serve:$REL" "$repo"
}

cmd_triton_image() {
    docker build -f "$REPO_ROOT/docker/Dockerfile.serve" --target runtime \
        --build-arg "NGC_RELEASE=$REL" -t "ptqd-triton:$REL" "$REPO_ROOT/docker"
}

cmd_serve() {
    docker run --rm --gpus all \
        -p 8000:8000 -p 8001:8001 -p 8002:8002 \
        "ptqd-serve:$REL"
}

usage_line="usage: $0 {release|build|export [EXPORT-TRT ARGS...]|serve-image|triton-image|serve|all [EXPORT-TRT ARGS...]}"

[[ $# -ge 1 ]] || die "$usage_line"
sub="$1"
shift

case "$sub" in
    release | build | export | serve-image | triton-image | serve | all) ;;
    -h | --help)
        echo "$usage_line"
        exit 0
        ;;
    *) die "unknown subcommand '$sub' (expected release, build, export, serve-image, triton-image, serve or all)" ;;
esac

REL="$(read_release)"

case "$sub" in
    release) echo "$REL" ;;
    build) cmd_build ;;
    export) cmd_export "$@" ;;
    serve-image) cmd_serve_image ;;
    triton-image) cmd_triton_image ;;
    serve) cmd_serve ;;
    all)
        cmd_build
        cmd_export "$@"
        cmd_serve_image
        cmd_serve
        ;;
esac
