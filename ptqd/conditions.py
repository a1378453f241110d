"""A loaded model's conditioning on the torch side: the PipelineSpec the runtime reads, the
prompts or classes calibration draws with, and torch-backed tokenizer / text encoder / VAE
callables that plug into the numpy runtime (`engines.conditioning`), so calibration, `ptqd
sample --backend torch` and the deployed sampler share one Conditioner and one guidance.
"""
from __future__ import annotations

import numpy as np
import torch

from ptqd.devices import module_device, to_device
from ptqd.runtime.conditioning import TEXT_INPUT, Conditioner, PipelineSpec
from ptqd.runtime.layout import CLASS_INPUT
from ptqd.errors import UserError

# diffusers' StableDiffusionPipeline default, and the scale PTQD evaluates LDM-4 ImageNet at
DEFAULT_GUIDANCE = {"text": 7.5, "class": 3.0}
# Calibration prompts when no --prompts file is given: varied subjects, styles and lengths,
# so the activation ranges cover more than one kind of text embedding.
DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dusk",
    "a close-up photo of a red fox in the snow",
    "an oil painting of a quiet village street",
    "a bowl of fruit on a wooden table, studio lighting",
    "a futuristic city skyline at night, neon lights",
    "a pencil sketch of an old man reading",
    "a mountain lake reflecting pine trees",
    "a cat sleeping on a windowsill",
    "a plate of pasta with basil, food photography",
    "a vintage car parked by the sea",
    "an abstract pattern of blue and orange shapes",
    "a portrait of a woman with curly hair, soft light",
    "a castle on a hill under storm clouds",
    "a robot painting a picture in a studio",
    "a field of sunflowers under a clear sky",
)


def _sample_size(config) -> int:
    size = config.sample_size
    return size if isinstance(size, int) else size[0]


def latent_shape(unet) -> list[int]:
    size = _sample_size(unet.config)
    return [unet.config.in_channels, size, size]


def image_shape(model) -> list[int]:
    """[C, H, W] of the final image: the VAE decoder's output, or the UNet's sample."""
    shape = latent_shape(model.unet)
    if model.vae is None:
        return shape
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    return [model.vae.config.out_channels, shape[1] * factor, shape[2] * factor]


def pipeline_spec(model, guidance_scale: float | None, conditions: tuple = ()) -> PipelineSpec:
    """The spec of `model` at the guidance scale it is calibrated and deployed with;
    a bad scale or condition for this model is a UserError."""
    from ptqd.model import class_labels, conditioning_kind

    kind = conditioning_kind(model.source, model.unet.config)
    spec = PipelineSpec(kind=kind, latent=model.vae is not None, image_shape=image_shape(model))
    if kind == "unconditional":
        if guidance_scale not in (None, 1.0) or conditions:
            raise UserError(f"model {model.source.spec!r} is unconditional: --guidance-scale, --prompts "
                            "and --classes apply to class- or text-conditioned models")
        return spec
    scale = DEFAULT_GUIDANCE[kind] if guidance_scale is None else float(guidance_scale)
    if not 1.0 <= scale < float("inf"):
        raise UserError(f"--guidance-scale {guidance_scale}: must be at least 1 (1 = no guidance)")
    spec.guidance_scale = scale
    if kind == "class":
        spec.num_classes, spec.null_class = class_labels(model.source, model.unet.config)
        spec.unet_inputs = [{"name": CLASS_INPUT, "dtype": "int64", "dims": []}]
        spec.default_conditions = list(range(spec.num_classes))
    else:
        spec.max_length = int(model.tokenizer.model_max_length)
        hidden = int(model.text_encoder.config.hidden_size)
        spec.unet_inputs = [{"name": TEXT_INPUT, "dtype": "float32", "dims": [spec.max_length, hidden]}]
        spec.default_conditions = list(DEFAULT_PROMPTS)
    try:
        spec.default_conditions = spec.check_conditions(conditions)
    except ValueError as exc:
        given = "--prompts" if conditions and isinstance(conditions[0], str) else "--classes"
        raise UserError(f"{given}: {exc}") from None
    return spec


class TorchTokenizer:
    """transformers' tokenizer as StableDiffusionPipeline calls it, as a numpy callable."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[str]) -> np.ndarray:
        out = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np")
        return out.input_ids.astype(np.int64)


class TorchModule:
    """A torch module as a numpy callable (text encoder: last hidden state; VAE: decode)."""

    def __init__(self, fn, device="cpu"):
        self.fn, self.device = fn, device

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(to_device(x, self.device)).float().cpu().numpy()


def text_encoder_fn(text_encoder):
    return TorchModule(lambda ids: text_encoder(ids)[0], module_device(text_encoder))


def vae_decoder_fn(vae):
    if vae is None:
        return None
    return TorchModule(lambda z: vae.decode(z / vae.config.scaling_factor).sample)


def torch_conditioner(model, spec: PipelineSpec, conditions: list | None = None) -> Conditioner | None:
    """Conditions images with the torch text encoder (None for unconditional models)."""
    if not spec.conditional:
        return None
    items = conditions or spec.default_conditions
    if spec.kind == "class":
        return Conditioner(spec, items)
    return Conditioner(spec, items, TorchTokenizer(model.tokenizer), text_encoder_fn(model.text_encoder))


def example_conditioning(model, spec: PipelineSpec, batch: int) -> dict[str, np.ndarray]:
    """UNet conditioning inputs for tracing and probing: the default conditions' first ones."""
    conditioner = torch_conditioner(model, spec)
    if conditioner is None:
        return {}
    return conditioner.chunk_inputs(0, batch)[0]
