"""Find and load the diffusion model that `--model` names.

Accepted: the name of a built-in model, a diffusers pipeline folder (model_index.json with
unet/ and scheduler/), or one folder holding a UNet config, its weights and a scheduler
config. Everything else is a UserError in one sentence.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ptqd.errors import UserError

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODELS = {"digits": BUILTIN_DIR / "digits-ddpm"}
DEFAULT_MODEL = "digits"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SUPPORTED_UNETS = ("UNet2DModel",)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's UNet and scheduler live on disk, and the hash that identifies it."""
    spec: str
    unet_dir: Path
    scheduler_dir: Path
    weights: Path
    sha256: str
    builtin: bool

    @property
    def extras_dir(self) -> Path | None:
        """The built-in model's classifier folder (None for user models)."""
        folder = self.unet_dir.parent / "classifier"
        return folder if self.builtin and folder.is_dir() else None


def resolve_model(spec: str | None) -> ModelSource:
    spec = spec or DEFAULT_MODEL
    if spec in BUILTIN_MODELS:
        return _pipeline_source(spec, BUILTIN_MODELS[spec], builtin=True)
    path = Path(spec)
    if not path.exists():
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise UserError(f"--model {spec!r} is neither a built-in model ({known}) nor an existing path")
    if not path.is_dir():
        raise UserError(f"--model {spec!r} is a file; give a diffusers model folder")
    if (path / "model_index.json").is_file():
        return _pipeline_source(spec, path, builtin=False)
    if (path / "config.json").is_file() and (path / "scheduler_config.json").is_file():
        return _source(spec, path, path, builtin=False)
    raise UserError(f"--model {spec!r} is not a diffusers model: expected model_index.json with "
                    "unet/ and scheduler/, or config.json + weights + scheduler_config.json")


def _pipeline_source(spec: str, folder: Path, builtin: bool) -> ModelSource:
    unet_dir, sched_dir = folder / "unet", folder / "scheduler"
    if not (unet_dir / "config.json").is_file() or not (sched_dir / "scheduler_config.json").is_file():
        raise UserError(f"--model {spec!r} has model_index.json but lacks unet/config.json or "
                        "scheduler/scheduler_config.json")
    return _source(spec, unet_dir, sched_dir, builtin)


def _source(spec: str, unet_dir: Path, sched_dir: Path, builtin: bool) -> ModelSource:
    weights = next((unet_dir / f for f in WEIGHT_FILES if (unet_dir / f).is_file()), None)
    if weights is None:
        raise UserError(f"--model {spec!r}: no UNet weights in {unet_dir} (expected one of "
                        f"{', '.join(WEIGHT_FILES)})")
    config = _read_json(unet_dir / "config.json", spec)
    cls = config.get("_class_name", "UNet2DModel")
    if cls not in SUPPORTED_UNETS:
        raise UserError(f"--model {spec!r}: UNet class {cls} is not supported "
                        f"(supported: {', '.join(SUPPORTED_UNETS)})")
    files = [unet_dir / "config.json", weights, sched_dir / "scheduler_config.json"]
    return ModelSource(spec, unet_dir, sched_dir, weights, _hash_files(files), builtin)


def _read_json(path: Path, spec: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {spec!r}: {path.name} is not valid JSON ({exc})") from None


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_unet(source: ModelSource):
    """The UNet in eval mode, float32, on the CPU."""
    from diffusers import UNet2DModel
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    try:
        unet = UNet2DModel.from_pretrained(str(source.unet_dir), low_cpu_mem_usage=False)
    except Exception as exc:  # diffusers/safetensors raise many types for a damaged file
        raise UserError(f"--model {source.spec!r}: cannot load UNet weights from "
                        f"{source.weights} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return unet.float().eval().requires_grad_(False)


def load_scheduler_config(source: ModelSource) -> dict:
    """The model's scheduler config, checked for what the DDIM sampler here can run."""
    config = _read_json(source.scheduler_dir / "scheduler_config.json", source.spec)
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise UserError(f"--model {source.spec!r}: prediction_type "
                        f"{config['prediction_type']!r} is not supported (only 'epsilon')")
    if config.get("thresholding", False):
        raise UserError(f"--model {source.spec!r}: dynamic thresholding is not supported")
    return config
