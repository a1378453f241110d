"""Resumable export-trt: a rerun reuses every stage whose inputs are unchanged.

Each stage's record in manifest.json holds two digests: of its inputs (the options that
shape it and the files of the stages before it) and of its outputs as it wrote them. A
stage is reused only when both still match: same inputs, and outputs nobody changed since
(a `ptqd build --force` with other options, say, changes the engines and so forces a redo).
Reused stage folders are hard-linked into the new output, not copied or recomputed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ptqd.output import file_sha256, is_artifact, link_or_copy, read_manifest

STAGE_DIRS = {"calibrate": ("calibration",), "export": ("onnx", "scheduler"),
              "engines": ("engines",), "deploy": ("triton",), "report": ("report",)}


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.absolute()), stat.st_mtime_ns, stat.st_size)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]


def tree_digest(root: Path, dirs: tuple[str, ...]) -> str:
    """One sha256 over every file (path and content) under root/dir for dir in dirs."""
    digest = hashlib.sha256()
    for name in dirs:
        base = root / name
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
        for path in files:
            rel = path.relative_to(root)
            if not is_artifact(rel):
                continue
            digest.update(f"{rel.as_posix()}\0{_file_digest(path)}\n".encode())
    return digest.hexdigest()


def inputs_digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=link_or_copy, ignore=shutil.ignore_patterns("__pycache__"))


class StageLedger:
    """What the previous output recorded per stage, and what this run records."""

    def __init__(self, previous: Path | None):
        self.previous = previous
        records = read_manifest(previous).get("stage_records") if previous is not None else None
        self.old: dict = records if isinstance(records, dict) else {}
        self.records: dict = {}

    def reusable(self, stage: str, inputs: str) -> bool:
        record = self.old.get(stage)
        return (record is not None and record.get("inputs") == inputs
                and tree_digest(self.previous, STAGE_DIRS[stage]) == record.get("outputs"))

    def reuse(self, stage: str, root: Path) -> None:
        for name in STAGE_DIRS[stage]:
            if (self.previous / name).is_dir():
                _link_tree(self.previous / name, root / name)

    def record(self, stage: str, inputs: str, root: Path) -> None:
        self.records[stage] = {"inputs": inputs, "outputs": tree_digest(root, STAGE_DIRS[stage])}
