"""A real Triton server on this machine, from the `tritonserver` binary that the
`nvidia-pytriton` wheel bundles (Python backend only), for `ptqd serve` and the tests.

The server runs from its own environment (`make triton-env`: numpy<2, onnxruntime,
nvidia-pytriton), because the Python backend's responses come back empty under NumPy 2.
What makes the bundled binary work, found by trying (BACKENDS.md):
- the backend directory must hold the Python backend and the stub built for the
  environment's Python version, which the wheel keeps apart (python_backend_stubs/3.X);
- the stub embeds libpython and finds its prefix through `python3` on PATH, so the
  environment's bin/ goes first on PATH (PYTHONPATH does not reach the stub);
- the server's own libraries are in nvidia_pytriton.libs (LD_LIBRARY_PATH).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ptqd.errors import UserError

ENV_VAR = "PTQD_TRITON_ENV"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002   # Triton's defaults
# How long a stopping server waits for requests in flight, and for clients' open connections,
# before it exits: Triton's default, 30 s, here (an open connection would hold `ptqd serve`'s
# Ctrl-C that long); a pod, where a request is a whole sampling run, waits KUBERNETES_EXIT_S.
EXIT_TIMEOUT_S = 30


def server_arguments(repository: str, http_port: int = HTTP_PORT, grpc_port: int = GRPC_PORT,
                     metrics_port: int = METRICS_PORT, exit_timeout_s: int = EXIT_TIMEOUT_S) -> list[str]:
    """tritonserver's arguments for a ptqd repository, wherever it runs: `ptqd serve` here and
    the Kubernetes Deployment (deploy/kubernetes.py) both start the server with these.
    Every model is loaded at start (model control "none": the sampler calls the others), a
    model that fails to load stops the server instead of serving without it, and the server
    is ready only once every model is: what the probes and the readiness wait rely on."""
    return [f"--model-repository={repository}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
            "--allow-metrics=true", f"--metrics-port={metrics_port}", "--model-control-mode=none",
            "--exit-on-error=true", "--strict-readiness=true", f"--exit-timeout-secs={exit_timeout_s}"]


def local_arguments(backend_dir: Path) -> list[str]:
    """What only this machine's server adds: the Python backend assembled from the wheel
    (_backend_dir), and every port on loopback (the container listens on all addresses)."""
    return [f"--backend-directory={backend_dir}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1"]


def default_env() -> Path:
    """$PTQD_TRITON_ENV, else .venv-triton beside the environment ptqd runs in."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return Path(sys.prefix).parent / ".venv-triton"


def _site_packages(env: Path) -> Path:
    for candidate in sorted(env.glob("lib/python3*/site-packages")):
        if (candidate / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
            return candidate
    raise UserError(f"no Triton server environment at {env} (nvidia-pytriton not found): "
                    f"run `make triton-env`, or point --triton-env / ${ENV_VAR} at one")


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalTritonServer:
    """tritonserver on 127.0.0.1 serving `repository`; a context manager that always stops it."""

    def __init__(self, repository: Path, env: Path | None = None, http_port: int | None = None,
                 grpc_port: int | None = None, log_path: Path | None = None, metrics_port: int | None = None,
                 arguments: list[str] | None = None):
        self.repository = Path(repository).absolute()
        self.env = Path(env or default_env()).absolute()
        self.site = _site_packages(self.env)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        # the server's own arguments (server_arguments); another list (a Kubernetes container's
        # args, its ports and repository mapped to this machine) replaces them whole
        self.arguments = arguments or server_arguments(str(self.repository), self.http_port, self.grpc_port,
                                                       self.metrics_port)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._scratch: tempfile.TemporaryDirectory | None = None
        self.start_seconds: float | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _backend_dir(self, scratch: Path) -> Path:
        dist = self.site / "pytriton" / "tritonserver"
        version = self.site.parent.name.removeprefix("python")
        python = scratch / "backends" / "python"
        python.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(dist / "backends" / "python" / name, python / name)
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise UserError(f"nvidia-pytriton in {self.env} has no Python backend stub for Python {version}")
        shutil.copy2(stub, python / "triton_python_backend_stub")
        return scratch / "backends"

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.env / 'bin'}:{env.get('PATH', '')}"
        libs = str(self.site / "nvidia_pytriton.libs")
        env["LD_LIBRARY_PATH"] = f"{libs}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else libs
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # keep __pycache__ out of the repository
        return env

    def command(self, backend_dir: Path) -> list[str]:
        binary = self.site / "pytriton" / "tritonserver" / "bin" / "tritonserver"
        return [str(binary), *self.arguments, *local_arguments(backend_dir)]

    def start(self, timeout: float = 180.0) -> "LocalTritonServer":
        if not self.repository.is_dir():
            raise UserError(f"{self.repository} is not a Triton model repository")
        # checked first: readiness is polled over HTTP, and another server on the port would answer
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            if port_in_use(port):
                raise UserError(f"port {port} on 127.0.0.1 is in use; choose another "
                                "(--http-port/--grpc-port/--metrics-port)")
        self._scratch = tempfile.TemporaryDirectory(prefix="ptqd-triton-")
        scratch = Path(self._scratch.name)
        log = open(self.log_path or scratch / "tritonserver.log", "wb")
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command(self._backend_dir(scratch)), stdout=log,
                                        stderr=subprocess.STDOUT, env=self._environment(),
                                        start_new_session=True)
        log.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - started
        return self

    def log_tail(self, lines: int = 15) -> str:
        path = self.log_path or (Path(self._scratch.name) / "tritonserver.log" if self._scratch else None)
        if path is None or not Path(path).is_file():
            return ""
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])

    def last_error(self) -> str:
        """The server's last error line (one line, for a one-line message)."""
        lines = self.log_tail(200).splitlines()
        errors = [line for line in lines if line.startswith("E") or "error" in line.lower()]
        return (errors or lines or ["(no log)"])[-1].strip()[:300]

    def ready(self) -> bool:
        """Every model ready, and the metrics endpoint up where metrics are on (Triton starts
        it after the HTTP endpoint answers)."""
        urls = [f"http://{self.http_url}/v2/health/ready"]
        if "--allow-metrics=true" in self.arguments:
            urls.append(self.metrics_url)
        try:
            for url in urls:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status != 200:
                        return False
            return True
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"tritonserver exited (code {self.process.returncode}) before it was "
                                f"ready: {self.last_error()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise UserError(f"tritonserver not ready after {timeout:.0f} s: {self.last_error()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            exit_timeout = next((int(a.split("=", 1)[1]) for a in self.arguments
                                 if a.startswith("--exit-timeout-secs=")), EXIT_TIMEOUT_S)
            try:
                self.process.wait(timeout=exit_timeout + 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> "LocalTritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
