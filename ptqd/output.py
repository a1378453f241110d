"""The output directory: checked before work starts, written atomically, described by a manifest.

A run builds into a temporary sibling of OUT and renames it into place only once complete,
so an interrupted or failed run leaves the previous OUT as it was and nothing half-written.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ptqd.errors import UserError
from ptqd.runtime.layout import graph_files

MANIFEST = "manifest.json"


def check_output_dir(path: Path, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} is a file; give a directory path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UserError(f"output {path} exists and is not empty; pass --force to replace it")
    if not path.parent.exists():
        raise UserError(f"cannot create output {path}: {path.parent} does not exist")


def check_output_file(path: Path, force: bool) -> None:
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file path")
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise UserError(f"cannot write {path}: {path.parent} does not exist")


@contextlib.contextmanager
def staged_directory(final: Path):
    """Yield an empty temporary sibling of `final`; on success it replaces `final`."""
    final = final.absolute()
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would keep a non-root server out of OUT/triton
    try:
        yield staging
        replace_directory(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def replace_directory(new: Path, final: Path) -> None:
    """Swap `new` in for `final`; the old one is removed only after the new one is in place."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def is_artifact(rel: Path) -> bool:
    """Whether a file under OUT (path relative to OUT) is one of its artifacts: not a hidden
    file (staging and atomic-write leftovers) nor a Python cache (Triton's Python backend
    writes one beside each model.py it imports from OUT/triton)."""
    return not any(part.startswith(".") or part == "__pycache__" for part in rel.parts)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link where the filesystem allows (graphs and plans can be large), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def file_sha256(*paths: Path) -> str:
    """sha256 of the files' bytes, one after the other."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def graph_sha256(graph: Path) -> str:
    """sha256 of a graph and, after it, its external-data file if it has one: what a plan was
    built from (the build script hashes the same bytes with `cat | sha256sum`)."""
    return file_sha256(*graph_files(graph))


def tool_versions() -> dict:
    from importlib import metadata

    versions = {}
    for dist in ("ptqd", "torch", "diffusers", "onnx", "onnxruntime", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def read_manifest(root: Path) -> dict:
    """root's manifest.json as a dict; {} if it is missing, unreadable or not an object."""
    try:
        doc = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_manifest(root: Path, config: dict, model_sha256: str, stages: list[str],
                   stage_records: dict | None = None) -> Path:
    """List every file under root (but the manifest and Python's caches) with its sha256 and
    size; stage_records are export-trt's digests for resuming (ptqd.resume)."""
    artifacts = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
                       and is_artifact(p.relative_to(root))):
        artifacts.append({"path": path.relative_to(root).as_posix(),
                          "sha256": file_sha256(path), "bytes": path.stat().st_size})
    doc = {"format_version": 1, "config": config, "model_sha256": model_sha256,
           "stages": stages, "tools": tool_versions(), "stage_records": stage_records or {},
           "artifacts": artifacts}
    target = root / MANIFEST
    atomic_write_bytes(target, (json.dumps(doc, indent=2) + "\n").encode())
    return target
