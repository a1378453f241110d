"""Find and load the diffusion model that `--model` names.

Accepted: the name of a built-in model, a diffusers pipeline folder (model_index.json with the
denoiser in unet/ or transformer/ and scheduler/, and for latent or text-conditioned models
vae/, text_encoder/, tokenizer/ (and SDXL's text_encoder_2/, tokenizer_2/)), or one folder
holding a denoiser config, its weights and a scheduler config. Everything else is a UserError
in one sentence.

Which model family a folder holds (ptqd.families) is read from its denoiser's config alone,
before torch is imported; the family then says what the pipeline must contain and how its
parts are used.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ptqd.errors import UserError
from ptqd.families import DENOISER_FOLDERS, ModelFamily, detect

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODELS = {"digits": BUILTIN_DIR / "digits-ddpm", "digits-dit": BUILTIN_DIR / "digits-dit"}
# the digit classifier shipped beside the built-in models: the judge of their samples (class
# accuracy) and the feature space of their Fréchet distance
BUILTIN_CLASSIFIER = BUILTIN_DIR / "digits-ddpm" / "classifier"
DEFAULT_MODEL = "digits"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
COMPONENTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's denoiser, scheduler and other components live on disk, its family, and
    the hash that identifies it."""
    spec: str
    denoiser_dir: Path
    scheduler_dir: Path
    weights: Path
    sha256: str
    builtin: bool
    family: ModelFamily
    denoiser_class: str = "UNet2DModel"
    components: dict = field(default_factory=dict)   # vae / text_encoder / tokenizer ... -> folder
    model_index: dict = field(default_factory=dict)

    @property
    def extras_dir(self) -> Path | None:
        """The built-in models' classifier folder (None for user models)."""
        return BUILTIN_CLASSIFIER if self.builtin and BUILTIN_CLASSIFIER.is_dir() else None


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
                    f"{' or '.join(f'{d}/' for d in DENOISER_FOLDERS)} and scheduler/, or config.json + weights + "
                    "scheduler_config.json")


def _pipeline_source(spec: str, folder: Path, builtin: bool) -> ModelSource:
    denoiser_dir = next((folder / d for d in DENOISER_FOLDERS if (folder / d / "config.json").is_file()), None)
    sched_dir = folder / "scheduler"
    if denoiser_dir is None or not (sched_dir / "scheduler_config.json").is_file():
        wanted = " or ".join(f"{d}/config.json" for d in DENOISER_FOLDERS)
        raise UserError(f"--model {spec!r} has model_index.json but lacks a denoiser ({wanted}) or "
                        "scheduler/scheduler_config.json")
    index = _read_json(folder / "model_index.json", spec)
    if not isinstance(index, dict):
        raise UserError(f"--model {spec!r}: model_index.json is not a JSON object")
    if isinstance(index.get("vqvae"), list) and index["vqvae"][0] is not None:
        raise UserError(f"--model {spec!r}: VQ-VAE latent models (vqvae/) are not supported (AutoencoderKL vae/ is)")
    components = {name: folder / name for name in COMPONENTS if isinstance(index.get(name), list)
                  and index[name] and index[name][0] is not None and (folder / name).is_dir()}
    return _source(spec, denoiser_dir, sched_dir, builtin, components, index)


def _component_files(folder: Path) -> list[Path]:
    """A component's configs, weights and tokenizer files (its top level, not hidden)."""
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def _check_components(spec: str, family: ModelFamily, components: dict) -> None:
    needed = [p for part in family.text_parts for p in (part.component, part.tokenizer)]
    missing = [name for name in needed if name not in components]
    if missing:
        raise UserError(f"--model {spec!r}: a {family.description} needs its pipeline's "
                        f"{', '.join(f'{m}/' for m in missing)} (give the whole pipeline folder)")


def _source(spec: str, denoiser_dir: Path, sched_dir: Path, builtin: bool, components: dict | None = None,
            index: dict | None = None) -> ModelSource:
    config = _read_json(denoiser_dir / "config.json", spec)
    cls = config.get("_class_name", "UNet2DModel")
    family = detect(spec, cls, config, index)
    weights = next((denoiser_dir / f for f in WEIGHT_FILES if (denoiser_dir / f).is_file()), None)
    if weights is None:
        raise UserError(f"--model {spec!r}: no {family.denoiser_label} weights in {denoiser_dir} (expected one of "
                        f"{', '.join(WEIGHT_FILES)})")
    components = components or {}
    _check_components(spec, family, components)
    files = [denoiser_dir / "config.json", weights, sched_dir / "scheduler_config.json"]
    for name in sorted(components):
        files += _component_files(components[name])
    if index and (components or family.kind != "unconditional"):
        # a conditional pipeline's model_index.json says which parts load and its null class
        files.append(denoiser_dir.parent / "model_index.json")
    return ModelSource(spec, denoiser_dir, sched_dir, weights, _hash_files(files), builtin, family, cls, components,
                       index or {})


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


def _load(source: ModelSource, what: str, folder: Path, load):
    try:
        model = load(str(folder))
    except Exception as exc:  # diffusers/transformers/safetensors raise many types for a damaged file
        where = (f"{source.family.denoiser_label} weights from {source.weights}" if what == "denoiser"
                 else f"the {what} from {folder}")
        raise UserError(f"--model {source.spec!r}: cannot load {where} "
                        f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})") from None
    return model.float().eval().requires_grad_(False) if hasattr(model, "eval") else model


def load_denoiser(source: ModelSource):
    """The denoiser (UNet or transformer) in eval mode, float32, on the CPU."""
    import diffusers
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    cls = getattr(diffusers, source.denoiser_class)
    return _load(source, "denoiser", source.denoiser_dir, lambda d: cls.from_pretrained(d, low_cpu_mem_usage=False))


def load_vae(source: ModelSource):
    """The pipeline's AutoencoderKL (None for a pixel-space model)."""
    if "vae" not in source.components:
        return None
    from diffusers import AutoencoderKL

    return _load(source, "VAE", source.components["vae"],
                 lambda d: AutoencoderKL.from_pretrained(d, low_cpu_mem_usage=False))


def _transformers_class(source: ModelSource, component: str, allowed: tuple[str, ...]):
    """The transformers class model_index.json names for a component, if the family takes it."""
    named = source.model_index.get(component, [None, allowed[0]])[1]
    if named not in allowed:
        raise UserError(f"--model {source.spec!r}: {component} is a {named}; a {source.family.description} "
                        f"takes {' or '.join(allowed)}")
    import transformers

    return getattr(transformers, named)


def load_text_parts(source: ModelSource) -> tuple[dict, dict]:
    """({tokenizer folder: tokenizer}, {text encoder folder: encoder}) of a text-conditioned
    pipeline, as its family lists them; empty for other models."""
    if not source.family.text_parts:
        return {}, {}
    try:
        from transformers.utils import logging as tlogging
    except ImportError:
        raise UserError("text-conditioned models need transformers, a ptqd dependency: reinstall "
                        "ptqd (make install)") from None
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()  # transformers 5 shows a "Loading weights" bar per model
    tokenizers, encoders = {}, {}
    for part in source.family.text_parts:
        tok_cls = _transformers_class(source, part.tokenizer, part.tokenizer_classes)
        enc_cls = _transformers_class(source, part.component, part.classes)
        tokenizers[part.tokenizer] = _load(source, "tokenizer", source.components[part.tokenizer],
                                           tok_cls.from_pretrained)
        encoders[part.component] = _load(source, "text encoder", source.components[part.component],
                                         enc_cls.from_pretrained)
    return tokenizers, encoders


def load_scheduler_config(source: ModelSource) -> dict:
    """The model's scheduler config, checked for what the DDIM sampler here can run."""
    config = _read_json(source.scheduler_dir / "scheduler_config.json", source.spec)
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise UserError(f"--model {source.spec!r}: prediction_type "
                        f"{config['prediction_type']!r} is not supported (only 'epsilon')")
    if config.get("thresholding", False):
        raise UserError(f"--model {source.spec!r}: dynamic thresholding is not supported")
    return config


@dataclass
class LoadedModel:
    source: ModelSource
    denoiser: object
    scheduler_config: dict
    vae: object = None            # latent models: the AutoencoderKL whose decoder makes the image
    tokenizers: dict = field(default_factory=dict)      # text-conditioned models, by folder name
    text_encoders: dict = field(default_factory=dict)

    @property
    def family(self) -> ModelFamily:
        return self.source.family

    def release_modules(self, denoiser: bool = True) -> None:
        """Drop the torch modules (export does, once their graphs are written: the text
        encoders and VAE before the denoiser's graph is traced, the denoiser after) and give
        their memory back to the system; what was read from the configs (source, scheduler
        config, tokenizers) stays."""
        import gc

        from ptqd.memory import release_free_memory

        self.vae, self.text_encoders = None, {}
        if denoiser:
            self.denoiser = None
        gc.collect()   # diffusers' modules sit in reference cycles: freed only by the collector
        release_free_memory()

    def to(self, device) -> "LoadedModel":
        """The denoiser and text encoders moved to `device` (a torch.device), in place."""
        self.denoiser.to(device)
        for encoder in self.text_encoders.values():
            encoder.to(device)
        return self


def load_model(spec: str | ModelSource, steps: int, device=None) -> LoadedModel:
    """Resolve (unless given resolved), check and load --model; `steps` is checked against its
    training timesteps. The denoiser and text encoders go to `device` (a torch.device; None:
    the CPU), where everything torch does with them runs; the VAE decoder stays on the CPU,
    where the images are made."""
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    sched_cfg = load_scheduler_config(source)
    train_steps = int(sched_cfg.get("num_train_timesteps", 1000))
    if steps > train_steps:
        raise UserError(f"--steps {steps} exceeds the model's {train_steps} training timesteps")
    model = LoadedModel(source, load_denoiser(source), sched_cfg, load_vae(source), *load_text_parts(source))
    return model.to(device) if device is not None else model
