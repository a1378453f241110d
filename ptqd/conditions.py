"""A loaded model's conditioning on the torch side: the PipelineSpec the runtime reads (its
family fills in its part), the prompts or classes calibration draws with, and torch-backed
tokenizer / text encoder / VAE callables that plug into the numpy runtime
(`runtime.conditioning`), so calibration, `ptqd sample --backend torch` and the deployed
sampler share one Conditioner and one guidance.
"""
from __future__ import annotations

import numpy as np
import torch

from ptqd.devices import module_device, to_device
from ptqd.errors import UserError
from ptqd.families import family_of_module
from ptqd.families.base import vae_factor
from ptqd.families.text_encoders import TextEncoderOutputs
from ptqd.runtime.conditioning import Conditioner, PipelineSpec

# where the family's pipeline has no default of its own: diffusers' StableDiffusionPipeline
# default, and the scale PTQD evaluates LDM-4 ImageNet at
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


def latent_shape(denoiser) -> list[int]:
    """[C, H, W] of a denoiser module's sample, as its family reads it from the config."""
    return family_of_module(denoiser).sample_shape(denoiser.config)


def image_shape(model) -> list[int]:
    """[C, H, W] of the final image: the VAE decoder's output, or the denoiser's sample."""
    shape = latent_shape(model.denoiser)
    if model.vae is None:
        return shape
    factor = vae_factor(model)
    return [model.vae.config.out_channels, shape[1] * factor, shape[2] * factor]


def model_guidance(model) -> float | None:
    """The guidance scale a pipeline folder names for itself in model_index.json (ptqd's own
    class pipelines, such as digits-dit, do; diffusers' do not)."""
    value = model.source.model_index.get("guidance_scale")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        raise UserError(f"--model {model.source.spec!r}: model_index.json's guidance_scale {value!r} is not a "
                        "number of at least 1")
    return float(value)


def pipeline_spec(model, guidance_scale: float | None, conditions: tuple = ()) -> PipelineSpec:
    """The spec of `model` at the guidance scale it is calibrated and deployed with, its
    family's part filled in by the family; a bad scale or condition for this model is a
    UserError."""
    family = model.family
    spec = PipelineSpec(kind=family.kind, family=family.name, denoiser=family.denoiser,
                        latent=model.vae is not None, image_shape=image_shape(model),
                        prompt_preparation=family.prompt_preparation)
    if family.kind == "unconditional":
        if guidance_scale not in (None, 1.0) or conditions:
            raise UserError(f"model {model.source.spec!r} is unconditional: --guidance-scale, --prompts "
                            "and --classes apply to class- or text-conditioned models")
        return spec
    default = model_guidance(model) or family.default_guidance or DEFAULT_GUIDANCE[family.kind]
    scale = default if guidance_scale is None else float(guidance_scale)
    if not 1.0 <= scale < float("inf"):
        raise UserError(f"--guidance-scale {guidance_scale}: must be at least 1 (1 = no guidance)")
    spec.guidance_scale = scale
    if family.kind == "text":
        spec.default_conditions = list(DEFAULT_PROMPTS)
    for key, value in family.spec_fields(model).items():
        setattr(spec, key, value)
    try:
        spec.default_conditions = spec.check_conditions(conditions)
    except ValueError as exc:
        given = "--prompts" if conditions and isinstance(conditions[0], str) else "--classes"
        raise UserError(f"{given}: {exc}") from None
    return spec


class TorchTokenizer:
    """transformers' tokenizer as diffusers' pipelines call it (padded and truncated to the
    encoder's length), as a numpy callable: prompts -> (input_ids, attention_mask)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        out = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="np")
        return out.input_ids.astype(np.int64), out.attention_mask.astype(np.int64)


class TorchModule:
    """A torch module as a numpy callable (the VAE: decode)."""

    def __init__(self, fn, device="cpu"):
        self.fn, self.device = fn, device

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(to_device(x, self.device)).float().cpu().numpy()


class TorchTextEncoder:
    """A family's text encoder module (families.text_encoders) as a Conditioner's Encode:
    (input_ids, attention_mask) -> {denoiser input: array}."""

    def __init__(self, module: TextEncoderOutputs):
        self.module, self.device = module, module_device(module.encoder)

    @torch.no_grad()
    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.module(to_device(ids, self.device), to_device(mask, self.device))
        return {name: out.float().cpu().numpy() for name, out in zip(self.module.output_names, outputs)}


def text_encoder_modules(model) -> dict[str, TextEncoderOutputs]:
    """Per text encoder of the model's family (by folder name), the module that computes what
    the denoiser takes from it: what calibration runs and what the exporter writes."""
    return {part.component: TextEncoderOutputs(model.text_encoders[part.component], part)
            for part in model.family.text_parts}


def vae_decoder_fn(vae):
    if vae is None:
        return None
    return TorchModule(lambda z: vae.decode(z / vae.config.scaling_factor).sample)


def torch_conditioner(model, spec: PipelineSpec, conditions: list | None = None,
                      negative_prompt: str | None = None) -> Conditioner | None:
    """Conditions images with the torch text encoders (None for unconditional models)."""
    if not spec.conditional:
        return None
    items = conditions or spec.default_conditions
    if spec.kind == "class":
        return Conditioner(spec, items)
    modules = text_encoder_modules(model)
    text = {e["name"]: (TorchTokenizer(model.tokenizers[e["tokenizer"]], e["max_length"]),
                        TorchTextEncoder(modules[e["name"]])) for e in spec.text_encoders}
    return Conditioner(spec, items, text, negative_prompt)


def example_conditioning(model, spec: PipelineSpec, batch: int) -> dict[str, np.ndarray]:
    """Denoiser conditioning inputs for tracing and probing: the default conditions' first ones."""
    conditioner = torch_conditioner(model, spec)
    if conditioner is None:
        return {}
    return conditioner.chunk_inputs(0, batch)[0]
