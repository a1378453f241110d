"""Command line: `ptqd <stage>` for one stage, `export-trt` for the whole pipeline.

User mistakes surface as one line on stderr and a non-zero exit; `--debug` (or PTQD_DEBUG=1)
shows the traceback instead.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ptqd.errors import UserError
from ptqd.calibration.configs import DEFAULT_CALIB_BATCH, DEFAULT_CALIB_SAMPLES, DEFAULT_POLICY
from ptqd.calibration.gpus import DEFAULT_GPU, GPUS
from ptqd.model import DEFAULT_MODEL
from ptqd.runtime.formats import BASE_FORMATS, FORMATS

if TYPE_CHECKING:  # the stage module pulls in torch; the CLI imports it only when it runs
    from ptqd.calibration.request import CalibrationRequest

BACKENDS_SAMPLE = ("torch", "onnxruntime", "tensorrt")


def _model_option(f):
    return click.option("--model", default=DEFAULT_MODEL, show_default=True,
                        help="Built-in model name (digits, digits-dit), diffusers pipeline folder, or denoiser folder.")(f)


def _steps_option(f):
    return click.option("--steps", type=click.IntRange(1, 1000), default=50, show_default=True,
                        help="DDIM denoising steps.")(f)


def _eta_option(f):
    return click.option("--eta", type=click.FloatRange(min=0.0, max=1.0), default=0.0,
                        show_default=True, help="DDIM eta (0 = deterministic).")(f)


def _seed_option(f):
    # seeds travel as INT64 (Triton requests, numpy generators): bounded to what fits
    return click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
                        help="Seed; sample i of seed S is the same whatever backend or precision.")(f)


def _device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help="Where torch runs (FP trajectories, activation statistics, scale searches, GPTQ, "
                             "PTQD statistics, torch sampling): auto (CUDA when torch sees a GPU), cpu, cuda "
                             "or cuda:N. ONNX export always traces on the CPU.")(f)


def _condition_options(f):
    f = click.option("--negative-prompt", default=None,
                     help="Text models: the prompt of guidance's unconditional half, for every image [default: "
                          "the model's: empty, or zeros where its pipeline zeroes it (SDXL)].")(f)
    f = click.option("--class", "classes", default=None,
                     help="Class-conditional models: class labels, comma-separated; image j gets label j % count "
                          "[default: the calibrated classes].")(f)
    return click.option("--prompt", "prompts", multiple=True,
                        help="Text models: a prompt (repeat for several; image j gets prompt j % count) "
                             "[default: the calibration prompts].")(f)


def _conditions(prompts: tuple[str, ...], classes: str | None) -> tuple:
    from ptqd.condition_options import parse_classes

    if prompts and classes:
        raise UserError("--prompt and --class exclude each other (text or class-conditional model)")
    return tuple(prompts) or parse_classes(classes, "--class")


def _force_option(f):
    return click.option("--force", is_flag=True, help="Replace existing results.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="ptqd")
def cli(debug: bool) -> None:
    """ptqd: quantize a diffusion model with PTQD and ship it for TensorRT, ONNX Runtime and Triton."""
    if debug:
        os.environ["PTQD_DEBUG"] = "1"


@cli.command()
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--model", default=None, help=f"Without OUT: the model to sample [default: {DEFAULT_MODEL}].")
@click.option("--num", type=click.IntRange(min=1), default=16, show_default=True)
@_seed_option
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help="DDIM steps [default: 50, or OUT's calibrated count].")
@click.option("--eta", type=click.FloatRange(min=0.0, max=1.0), default=None,
              help="DDIM eta [default: 0, or OUT's calibrated eta].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Samples per denoiser call [default: 64, or the engines' profile maximum].")
@click.option("--backend", type=click.Choice(BACKENDS_SAMPLE), default="torch", show_default=True)
@click.option("--precision", default="mixed", show_default=True,
              help="With OUT: mixed (the calibrated schedule), fp32 (full precision), or a calibrated configuration (w4a8, w8a8, fp8, fp16...).")
@click.option("--no-correction", is_flag=True, help="With OUT: skip the PTQD correction (the ablation).")
@click.option("--graph", type=click.Choice(["fast", "reference"]), default="fast", show_default=True,
              help="With OUT and onnxruntime: the CPU-fast graphs, or the exact twins of fake-quant.")
@click.option("--cuda-graph", is_flag=True,
              help="With --backend tensorrt: capture each engine's work once per batch shape as a CUDA "
                   "graph and replay it at every step (less CPU launch overhead per step).")
@click.option("--output", "npy", type=click.Path(path_type=Path), help="Write images as .npy (float32 NCHW in [0, 1]).")
@click.option("--grid", type=click.Path(path_type=Path), help="Write an image grid as PNG.")
@_condition_options
@_device_option
@_force_option
def sample(out, model, num, seed, steps, eta, batch_size, backend, precision, no_correction, graph, cuda_graph,
           npy, grid, prompts, classes, negative_prompt, device, force):
    """Sample images: the full-precision --model, or (with OUT) an exported output."""
    from ptqd.sample import SampleRequest, run_sample

    run_sample(SampleRequest(out=out, model=model, num=num, seed=seed, steps=steps, eta=eta,
                             batch_size=batch_size, backend=backend, npy=npy, grid=grid,
                             force=force, precision=precision.lower(), correction=not no_correction,
                             graph=graph, conditions=_conditions(prompts, classes), cuda_graph=cuda_graph,
                             device=device, negative_prompt=negative_prompt))


def _calibration_options(f):
    options = [
        _model_option,
        click.option("--bits", type=int, default=None,
                     help="Weight bits (4 or 8) [default: 4; 8 with --format fp8, 4 with --format nvfp4]."),
        click.option("--act-bits", type=int, default=None,
                     help="Activation bits (4, 8, or 16 with --bits 4: w4a16, INT4 weight-only Linear layers in "
                          "blocks of 128, FP16 activations and convolutions) [default: 8]. 4 is an accuracy study, "
                          "not a speed-up: no runtime ptqd deploys to has 4-bit integer activation kernels."),
        click.option("--format", "fmt", type=click.Choice(BASE_FORMATS), default="int", show_default=True,
                     help="The base configuration's number format: int (--bits/--act-bits integer grids), fp8 "
                          "(E4M3 weights and activations; TensorRT runs FP8 on Ada, Hopper and Blackwell GPUs) or "
                          "nvfp4 (NVFP4 Linear layers, FP4 E2M1 in blocks of 16, FP8 convolutions; Blackwell only: "
                          "--target-gpu b200 or rtx5090); fp8 and nvfp4 leave --bits/--act-bits unset. Extra "
                          "configurations: --configs (w8a8, w4a16, fp8, nvfp4, fp16)."),
        _device_option,
        click.option("--sensitivity/--no-sensitivity", default=True, show_default=True,
                     help="Measure the per-layer sensitivity map (calibration/sensitivity.json): one denoiser call "
                          "per quantized layer on 32 recorded inputs."),
        click.option("--weight-rounding", type=click.Choice(["nearest", "gptq"]), default=None,
                     help="How weights meet their grid: nearest, or GPTQ reconstruction on the calibration "
                          "inputs [default: gptq below 8 weight bits, else nearest]."),
        _steps_option, _eta_option, _seed_option,
        click.option("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES, show_default=True,
                     help="Full-precision trajectories recorded for calibration."),
        click.option("--calib-batch", type=int, default=DEFAULT_CALIB_BATCH, show_default=True,
                     help="Samples per denoiser call in calibration (trajectories, statistics, GPTQ and sensitivity "
                          "probes; a guided model runs twice as many per call); lower it when a large model "
                          "runs out of memory."),
        click.option("--mixed-precision", default=DEFAULT_POLICY, show_default=True,
                     help="off, snr:<dB> (cheapest config reaching it), budget:<ratio> "
                          "(least noise within ratio x the base config's BOPs), or latency:<ratio> (least "
                          "noise within ratio x the fastest config's estimated latency on --target-gpu)."),
        click.option("--target-gpu", type=click.Choice(sorted(GPUS)), default=DEFAULT_GPU, show_default=True,
                     help="GPU whose datasheet peaks price the estimated step latencies (roofline per layer)."),
        click.option("--correction", default="auto", show_default=True,
                     help="auto (per step, chosen on held-out trajectories), paper, raw-k or bias-map."),
        click.option("--configs", "extra_configs", default="",
                     help="Extra configurations to calibrate, comma-separated: w<bits>a<bits> (w4a16: INT4 "
                          "weight-only), fp8, nvfp4, or fp16 (the float engine a schedule may fall back to) "
                          "(e.g. w4a4,fp16)."),
        click.option("--keep", default=None,
                     help="Layers kept in float (comma-separated glob patterns of module names) [default: the "
                          "model family's: conv_in,conv_out,time_embedding.* for UNets (SDXL adds add_embedding.*), "
                          "the patch and time embedders and final layer for transformers]."),
        click.option("--guidance-scale", type=float, default=None,
                     help="Conditional models: the classifier-free guidance scale calibrated and deployed "
                          "[default: 7.5 for text, 3 for class-conditional models]."),
        click.option("--prompts", type=click.Path(path_type=Path), default=None,
                     help="Text models: a file of calibration prompts, one per line [default: 16 built in]."),
        click.option("--classes", default=None,
                     help="Class-conditional models: calibration class labels, comma-separated [default: all]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _calibration_request(kw: dict) -> "CalibrationRequest":
    from ptqd.calibration.request import CalibrationRequest

    from ptqd.condition_options import parse_classes, read_prompt_file

    split = lambda text: tuple(p.strip() for p in text.split(",") if p.strip())
    if kw["prompts"] is not None and kw["classes"] is not None:
        raise UserError("--prompts and --classes exclude each other (text or class-conditional model)")
    conditions = read_prompt_file(kw["prompts"]) if kw["prompts"] is not None else parse_classes(kw["classes"])
    bits, act_bits = kw["bits"], kw["act_bits"]
    fixed = FORMATS[kw["fmt"]].fixed_bits
    if fixed is not None and {bits, act_bits} - {None, fixed}:
        raise UserError(f"--format {kw['fmt']} has {fixed}-bit weights and activations: leave --bits/--act-bits out")
    default_bits = fixed or 4
    return CalibrationRequest(
        model=kw["model"], bits=default_bits if bits is None else bits, act_bits=8 if act_bits is None else act_bits,
        format=kw["fmt"], steps=kw["steps"],
        eta=kw["eta"], seed=kw["seed"], calib_samples=kw["calib_samples"],
        mixed_precision=kw["mixed_precision"], correction=kw["correction"],
        extra_configs=split(kw["extra_configs"]), keep=None if kw["keep"] is None else split(kw["keep"]),
        guidance_scale=kw["guidance_scale"], conditions=conditions, weight_rounding=kw["weight_rounding"],
        target_gpu=kw["target_gpu"], sensitivity=kw["sensitivity"], calib_batch=kw["calib_batch"])


@cli.command()
@_calibration_options
@click.option("--output", "out", type=click.Path(path_type=Path), required=True)
@_force_option
def calibrate(out, force, **kw):
    """Calibrate: quantization parameters, PTQD statistics and the precision schedule."""
    from ptqd.pipeline import run_calibrate

    run_calibrate(_calibration_request(kw), out, force, kw["device"])


@cli.command("export")
@click.argument("out", type=click.Path(path_type=Path))
@_force_option
def export_cmd(out, force):
    """Export OUT's calibrated model: FP and QDQ ONNX graphs, the folded PTQD scheduler."""
    from ptqd.pipeline import run_export_stage

    run_export_stage(out, force)


def _engine_options(f):
    f = click.option("--batch", default="1,4,8", show_default=True,
                     help="Engine batch profile min,opt,max.")(f)
    return click.option("--backend", default="auto", show_default=True,
                        help="auto (TensorRT if installed, else ONNX Runtime), tensorrt or onnxruntime.")(f)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@_engine_options
@_force_option
def build(out, backend, batch, force):
    """Build engines for OUT's schedule: TensorRT plans, or ONNX Runtime sessions + build script."""
    from ptqd.pipeline import run_build_stage

    run_build_stage(out, backend, batch, force)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--unets", default="auto", show_default=True,
              help="How the sampler runs the denoisers (UNets or transformers): tensorrt (plans as Triton TensorRT models, via BLS), "
                   "onnxruntime (Python-backend ONNX Runtime models, via BLS), in-process (ONNX Runtime "
                   "inside the sampler), or auto (tensorrt when OUT has plans, else in-process).")
@click.option("--instances", type=click.IntRange(min=1), default=2, show_default=True,
              help="Sampler model instances (concurrent requests served at once).")
@click.option("--kubernetes", is_flag=True,
              help="Also write OUT/kubernetes: a Kustomize base (Deployment, Service, PodDisruptionBudget, "
                   "HorizontalPodAutoscaler, prometheus-adapter rule; KServe optional) serving OUT/triton.")
@click.option("--model-store", default="pvc", show_default=True,
              help="With --kubernetes: where the pods find the repository: pvc (a claim the base creates), "
                   "pvc:CLAIM (an existing one), s3://BUCKET/PATH or gs://BUCKET/PATH.")
@click.option("--storage-secret", default=None,
              help="With --kubernetes and s3:// or gs://: the secret holding the credentials [default: ptqd-storage].")
@click.option("--gpu-product", default=None,
              help="With --kubernetes: the nodes' nvidia.com/gpu.product label [default: from the GPU that "
                   "built the plans].")
@click.option("--min-replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --kubernetes: replicas the autoscaler keeps at least.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=4, show_default=True,
              help="With --kubernetes: replicas the autoscaler adds at most.")
@_force_option
def deploy(out, unets, instances, kubernetes, model_store, storage_secret, gpu_product, min_replicas,
           max_replicas, force):
    """Write OUT/triton, a model repository for `tritonserver --model-repository OUT/triton`
    (and with --kubernetes, OUT/kubernetes to serve it on a cluster)."""
    from ptqd.pipeline import run_deploy_stage

    options = {"model_store": model_store, "storage_secret": storage_secret, "gpu_product": gpu_product,
               "min_replicas": min_replicas, "max_replicas": max_replicas}
    if not kubernetes:
        ctx = click.get_current_context()
        given = [f"--{k.replace('_', '-')}" for k in options
                 if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT]
        if given:
            raise UserError(f"{', '.join(given)}: only with --kubernetes")
    run_deploy_stage(out, unets, instances, force, options if kubernetes else None)


def _triton_env_option(f):
    return click.option("--triton-env", type=click.Path(path_type=Path), default=None,
                        help="Environment with nvidia-pytriton [default: $PTQD_TRITON_ENV or .venv-triton "
                             "beside this environment; `make triton-env` makes it].")(f)


@cli.command()
@click.argument("repository", type=click.Path(path_type=Path))
@_triton_env_option
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True,
              help="Prometheus metrics (Triton's queue and compute times) on http://127.0.0.1:PORT/metrics.")
def serve(repository, triton_env, http_port, grpc_port, metrics_port):
    """Serve a repository (OUT/triton, or OUT) on 127.0.0.1 with the CPU Triton server until Ctrl-C."""
    import time

    from ptqd.deploy.server import LocalTritonServer

    if (repository / "triton").is_dir():
        repository = repository / "triton"
    server = LocalTritonServer(repository, triton_env, http_port, grpc_port, metrics_port=metrics_port)
    with server:
        click.echo(f"serving {repository} on http {server.http_url}, grpc {server.grpc_url}, "
                   f"metrics {server.metrics_url} "
                   f"(ready in {server.start_seconds:.1f} s); Ctrl-C stops it")
        while server.process.poll() is None:
            time.sleep(0.5)
        raise UserError(f"tritonserver exited (code {server.process.returncode}): {server.last_error()}")


@cli.command()
@click.option("--url", default=None, help="host:port of the server [default: 127.0.0.1:8000 for http, :8001 for grpc].")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)
@click.option("--num", type=click.IntRange(1, 2**31 - 1), default=16, show_default=True)
@_seed_option
@click.option("--first-index", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Index of the first image of the seed (images are numbered as in `ptqd sample`).")
@click.option("--output", "npy", type=click.Path(path_type=Path), help="Write images as .npy (float32 NCHW in [0, 1]).")
@click.option("--grid", type=click.Path(path_type=Path), help="Write an image grid as PNG.")
@_condition_options
@_force_option
def client(url, protocol, num, seed, first_index, npy, grid, prompts, classes, negative_prompt, force):
    """Ask a Triton server running OUT/triton for images."""
    import time

    from ptqd.deploy.client import request_images
    from ptqd.output import check_output_file
    from ptqd.sample import write_images

    if npy is None and grid is None:
        raise UserError("nothing to write: give --output x.npy and/or --grid x.png")
    url = url or ("127.0.0.1:8001" if protocol == "grpc" else "127.0.0.1:8000")
    for path in (npy, grid):
        if path is not None:
            check_output_file(path, force)
    started = time.perf_counter()
    conditions = _conditions(prompts, classes)
    images = request_images(url, num, seed, first_index, protocol,
                            prompts=tuple(c for c in conditions if isinstance(c, str)),
                            classes=tuple(c for c in conditions if isinstance(c, int)),
                            negative_prompt=negative_prompt)
    click.echo(f"{num} images from {url} ({protocol}) in {time.perf_counter() - started:.2f} s")
    write_images(images, npy, grid)
    for path in (npy, grid):
        if path is not None:
            click.echo(f"wrote {path}")


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--num", type=click.IntRange(min=16), default=128, show_default=True,
              help="Samples per variant (FP32, each configuration with/without PTQD, the mixed schedule).")
@_seed_option
@_force_option
def report(out, num, seed, force):
    """Write OUT/report: metrics.json, plots and report.html (what quantization cost, what PTQD won back)."""
    from ptqd.pipeline import run_report_stage

    run_report_stage(out, num, seed, force)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
def verify(out):
    """Check OUT against its manifest (sha256, size) and the stages against each other."""
    from ptqd.verify import verify as verify_output

    problems = verify_output(out)
    for line in problems:
        click.echo(f"{out}/{line}")
    if problems:
        click.echo(f"{len(problems)} problem(s) in {out}", err=True)
        raise SystemExit(1)
    click.echo(f"{out}: every artifact matches manifest.json and the stages agree")


@cli.command()
@click.argument("graphs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["tensorrt", "onnxruntime"]), default="tensorrt",
              show_default=True, help="Whose rules: TensorRT's, or only those ONNX Runtime shares.")
def lint(graphs, target):
    """Check QDQ ONNX graphs against TensorRT's explicit-quantization rules."""
    from ptqd.exporter.lint import lint_graph_file

    failed = False
    for path in graphs:
        violations = lint_graph_file(path, target)
        for v in violations:
            click.echo(f"{path}: {v}")
        if not violations:
            click.echo(f"{path}: clean ({target} rules)")
        failed = failed or bool(violations)
    if failed:
        raise SystemExit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_calibration_options
@click.option("--output", "out", type=click.Path(path_type=Path), default=Path("ptqd-out"),
              show_default=True)
@_engine_options
@click.option("--no-report", is_flag=True, help="Skip OUT/report (metrics, plots, report.html).")
@click.option("--report-samples", type=click.IntRange(min=16), default=128, show_default=True,
              help="Samples per variant in the report (same seeds for every variant).")
@_force_option
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def export_trt(out, force, debug, backend, batch, no_report, report_samples, **kw):
    """Run the whole pipeline on --model into OUT (default ./ptqd-out)."""
    from ptqd.pipeline import ExportRequest, run_export

    if debug:
        os.environ["PTQD_DEBUG"] = "1"
    run_export(ExportRequest(calibration=_calibration_request(kw), out=out, force=force,
                             backend=backend, batch=batch, report=not no_report,
                             report_samples=report_samples, device=kw["device"]))


def _run(command: click.Command, argv: list[str] | None) -> None:
    # SIGTERM unwinds like Ctrl-C so staged outputs are cleaned up, not left half-written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("PTQD_DEBUG") == "1"
    try:
        command.main(args=argv, prog_name=command.name, standalone_mode=False)
    except UserError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    cli.name = "ptqd"
    _run(cli, argv)


def export_trt_main(argv: list[str] | None = None) -> None:
    export_trt.name = "export-trt"
    _run(export_trt, argv)
