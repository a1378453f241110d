"""The console scripts (`ptqd`, `export-trt`) run in a fresh process forked from a warm one.

Every test that runs the CLI used to start the installed script from scratch, and a process
that loads a model spends ~10 s of this 2-core machine importing torch and diffusers before it
does anything (diffusers' UNet modules import its whole transformers zoo and torch._dynamo).
Here a multiprocessing fork server imports them once per test session; each CLI run is a child
forked from it: its own process, PID, memory, exit status, working directory, environment,
stdout and stderr (files, read back), so exit codes, one-line errors and tracebacks are what a
user's shell sees. Only the imports are shared. PTQD_TEST_SUBPROCESS=1 runs the installed scripts
instead (tests/test_interrupt.py always does: it sends real signals to the real script).
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback

# imported once in the fork server (what a model-loading command spends its first ~10 s on)
PRELOAD = ["tests.forked_cli_preload"]
_context = None


def _entry(entry: str):
    from ptqd.cli import export_trt_main, main

    return {"ptqd": main, "export-trt": export_trt_main}[entry]


def _child(entry: str, argv: list[str], cwd: str, env: dict, out_path: str, err_path: str) -> None:
    """Runs in the forked process: the console script's main, then exit with its status."""
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [entry, *argv]
    code = 0
    try:
        _entry(entry)(argv)
    except SystemExit as exc:
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()  # what interpreter shutdown does before the process ends
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def run(entry: str, args: list[str], cwd=None, timeout: int = 600, env: dict | None = None):
    """subprocess.run(capture_output=True, text=True) of the console script `entry`."""
    global _context
    if os.environ.get("PTQD_TEST_SUBPROCESS") == "1":
        script = os.path.join(os.path.dirname(sys.executable), entry)
        return subprocess.run([script, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="ptqd-cli-") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _context.Process(target=_child, args=(entry, list(args), str(cwd or os.getcwd()),
                                                      dict(os.environ if env is None else env), out_path, err_path))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([entry, *args], timeout)
        with open(out_path, encoding="utf-8") as f, open(err_path, encoding="utf-8") as g:
            stdout, stderr = f.read(), g.read()
    return subprocess.CompletedProcess([entry, *args], proc.exitcode, stdout, stderr)
