"""Find and load the diffusion model that `--model` names.

Accepted: the name of a built-in model, a diffusers pipeline folder (model_index.json with
unet/ and scheduler/, and for latent or text-conditioned models vae/, text_encoder/ and
tokenizer/, as Stable Diffusion folders have them), or one folder holding a UNet config, its
weights and a scheduler config. Everything else is a UserError in one sentence.

Conditioning, read from the configs: a UNet2DModel with class embeddings is class-conditional
(the last embedding, or model_index.json's "null_class", is the unconditional class of
classifier-free guidance, LDM's convention); a UNet2DConditionModel is text-conditioned
through its pipeline's CLIP text encoder and tokenizer.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ptqd.errors import UserError

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODELS = {"digits": BUILTIN_DIR / "digits-ddpm"}
DEFAULT_MODEL = "digits"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SUPPORTED_UNETS = ("UNet2DModel", "UNet2DConditionModel")
COMPONENTS = ("vae", "text_encoder", "tokenizer")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's UNet and scheduler live on disk, and the hash that identifies it."""
    spec: str
    unet_dir: Path
    scheduler_dir: Path
    weights: Path
    sha256: str
    builtin: bool
    unet_class: str = "UNet2DModel"
    components: dict = field(default_factory=dict)   # vae / text_encoder / tokenizer -> folder
    model_index: dict = field(default_factory=dict)

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
    index = _read_json(folder / "model_index.json", spec)
    if not isinstance(index, dict):
        raise UserError(f"--model {spec!r}: model_index.json is not a JSON object")
    if isinstance(index.get("vqvae"), list) and index["vqvae"][0] is not None:
        raise UserError(f"--model {spec!r}: VQ-VAE latent models (vqvae/) are not supported (AutoencoderKL vae/ is)")
    components = {name: folder / name for name in COMPONENTS if isinstance(index.get(name), list)
                  and index[name] and index[name][0] is not None and (folder / name).is_dir()}
    return _source(spec, unet_dir, sched_dir, builtin, components, index)


def _component_files(folder: Path) -> list[Path]:
    """A component's configs, weights and tokenizer files (its top level, not hidden)."""
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def _source(spec: str, unet_dir: Path, sched_dir: Path, builtin: bool, components: dict | None = None,
            index: dict | None = None) -> ModelSource:
    weights = next((unet_dir / f for f in WEIGHT_FILES if (unet_dir / f).is_file()), None)
    if weights is None:
        raise UserError(f"--model {spec!r}: no UNet weights in {unet_dir} (expected one of "
                        f"{', '.join(WEIGHT_FILES)})")
    config = _read_json(unet_dir / "config.json", spec)
    cls = config.get("_class_name", "UNet2DModel")
    if cls not in SUPPORTED_UNETS:
        raise UserError(f"--model {spec!r}: UNet class {cls} is not supported "
                        f"(supported: {', '.join(SUPPORTED_UNETS)})")
    components = components or {}
    if cls == "UNet2DConditionModel" and not {"text_encoder", "tokenizer"} <= set(components):
        raise UserError(f"--model {spec!r}: a UNet2DConditionModel needs its pipeline's text_encoder/ "
                        "and tokenizer/ (give the whole Stable Diffusion folder)")
    files = [unet_dir / "config.json", weights, sched_dir / "scheduler_config.json"]
    for name in sorted(components):
        files += _component_files(components[name])
    if index and (components or config.get("num_class_embeds")):
        # a conditional pipeline's model_index.json says which parts load and its null class
        files.append(unet_dir.parent / "model_index.json")
    return ModelSource(spec, unet_dir, sched_dir, weights, _hash_files(files), builtin, cls, components,
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
        where = f"UNet weights from {source.weights}" if what == "UNet" else f"the {what} from {folder}"
        raise UserError(f"--model {source.spec!r}: cannot load {where} "
                        f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})") from None
    return model.float().eval().requires_grad_(False) if hasattr(model, "eval") else model


def load_unet(source: ModelSource):
    """The UNet in eval mode, float32, on the CPU."""
    import diffusers
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    cls = getattr(diffusers, source.unet_class)
    unet = _load(source, "UNet", source.unet_dir, lambda d: cls.from_pretrained(d, low_cpu_mem_usage=False))
    _check_conditioning(source, unet.config)
    return unet


def _check_conditioning(source: ModelSource, cfg) -> None:
    """Refuse the UNet variants whose extra inputs ptqd does not produce."""
    unsupported = []
    if source.unet_class == "UNet2DConditionModel":
        unsupported = [k for k in ("class_embed_type", "num_class_embeds", "addition_embed_type")
                       if cfg.get(k) is not None]
    elif cfg.get("class_embed_type") is not None:
        unsupported = ["class_embed_type"]
    if unsupported:
        raise UserError(f"--model {source.spec!r}: UNet option {unsupported[0]}={cfg.get(unsupported[0])!r} "
                        "is not supported (supported: class labels on UNet2DModel via num_class_embeds, "
                        "text via UNet2DConditionModel)")


def conditioning_kind(source: ModelSource, unet_config) -> str:
    if source.unet_class == "UNet2DConditionModel":
        return "text"
    return "class" if unet_config.get("num_class_embeds") else "unconditional"


def class_labels(source: ModelSource, unet_config) -> tuple[int, int]:
    """(number of real classes, the null class): guidance's unconditional label is
    model_index.json's "null_class", or the last class embedding; the real classes are
    "num_classes" there, or every label below the null class."""
    embeds = int(unet_config["num_class_embeds"])
    try:
        null = int(source.model_index.get("null_class", embeds - 1))
        count = int(source.model_index.get("num_classes", null))
    except (TypeError, ValueError):
        raise UserError(f"--model {source.spec!r}: model_index.json's null_class/num_classes are not integers") from None
    if not 0 <= null < embeds or not 1 <= count <= embeds or null < count:
        raise UserError(f"--model {source.spec!r}: null class {null} with {count} classes does not fit the "
                        f"UNet's {embeds} class embeddings (the null class must follow the real classes)")
    return count, null


def load_vae(source: ModelSource):
    """The pipeline's AutoencoderKL (None for a pixel-space model)."""
    if "vae" not in source.components:
        return None
    from diffusers import AutoencoderKL

    return _load(source, "VAE", source.components["vae"],
                 lambda d: AutoencoderKL.from_pretrained(d, low_cpu_mem_usage=False))


def load_text_parts(source: ModelSource):
    """(tokenizer, text encoder) of a text-conditioned pipeline, or (None, None)."""
    if "text_encoder" not in source.components:
        return None, None
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as tlogging
    except ImportError:
        raise UserError("text-conditioned models need transformers, a ptqd dependency: reinstall "
                        "ptqd (make install)") from None
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()  # transformers 5 shows a "Loading weights" bar per model
    tokenizer = _load(source, "tokenizer", source.components["tokenizer"], CLIPTokenizer.from_pretrained)
    encoder = _load(source, "text encoder", source.components["text_encoder"], CLIPTextModel.from_pretrained)
    return tokenizer, encoder


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
    source: object
    unet: object
    scheduler_config: dict
    vae: object = None            # latent models: the AutoencoderKL whose decoder makes the image
    tokenizer: object = None      # text-conditioned models
    text_encoder: object = None

    def to(self, device) -> "LoadedModel":
        """The UNet and text encoder moved to `device` (a torch.device), in place."""
        self.unet.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self


def load_model(spec: str, steps: int, device=None) -> LoadedModel:
    """Resolve, check and load --model; `steps` is checked against its training timesteps.
    The UNet and text encoder go to `device` (a torch.device; None: the CPU), where everything
    torch does with them runs; the VAE decoder stays on the CPU, where the images are made."""
    source = resolve_model(spec)
    sched_cfg = load_scheduler_config(source)
    train_steps = int(sched_cfg.get("num_train_timesteps", 1000))
    if steps > train_steps:
        raise UserError(f"--steps {steps} exceeds the model's {train_steps} training timesteps")
    model = LoadedModel(source, load_unet(source), sched_cfg, load_vae(source), *load_text_parts(source))
    return model.to(device) if device is not None else model
