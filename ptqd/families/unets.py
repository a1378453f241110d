"""The UNet families: diffusers' UNet2DModel (unconditional, or class-conditional through its
class embedding, in pixel space or on a VAE's latents) and UNet2DConditionModel in Stable
Diffusion 1.x/2.x's layout (one CLIP text encoder) and in SDXL's (two CLIP encoders, pooled
text embedding and size conditions through `added_cond_kwargs`)."""
from __future__ import annotations

from ptqd.errors import UserError
from ptqd.families.base import (CROSS_ATTENTION_ROLES, LayerRole, ModelFamily, TextEncoderPart, class_bookkeeping, class_spec_fields,
                                text_input, vae_factor)
from ptqd.runtime.layout import TEXT_OUTPUT

# PTQD, Q-Diffusion and NVIDIA's recipes keep these in float: the first and last conv see
# the raw image and produce eps directly, and the time embedding feeds every block.
UNET_KEEP = ("conv_in", "conv_out", "time_embedding.*")
UNET_KEEP_REASON = "kept in float (first/last conv or time embedding by default; see keep_patterns)"
UNET_ROLES = (
    *CROSS_ATTENTION_ROLES,
    *(LayerRole(f"*.{leaf}", "attention projection") for leaf in ("to_q", "to_k", "to_v", "to_out.0")),
    LayerRole("time_embedding.*", "time embedder"),
)
CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")


def _refuse_options(spec: str, config: dict, options: tuple[str, ...], supported: str) -> None:
    for key in options:
        if config.get(key) is not None:
            raise UserError(f"--model {spec!r}: UNet option {key}={config.get(key)!r} is not supported "
                            f"(supported: {supported})")


class UNet2D(ModelFamily):
    name = "unet2d"
    description = "UNet2DModel, unconditional (pixel space, or latents with a VAE)"
    denoiser_classes = ("UNet2DModel",)
    default_keep, keep_reason, roles = UNET_KEEP, UNET_KEEP_REASON, UNET_ROLES

    def matches(self, class_name: str, config: dict) -> bool:
        return class_name in self.denoiser_classes and not config.get("num_class_embeds")

    def check(self, spec: str, config: dict, index: dict) -> None:
        _refuse_options(spec, config, ("class_embed_type",), "class labels on UNet2DModel via num_class_embeds, "
                        "text via UNet2DConditionModel")


class ClassUNet2D(UNet2D):
    """LDM's class-conditional UNet: the last class embedding (or model_index.json's
    null_class) is the unconditional class of classifier-free guidance."""
    name = "class-unet2d"
    description = "UNet2DModel with a class embedding (num_class_embeds), class-conditional"
    kind = "class"

    def matches(self, class_name: str, config: dict) -> bool:
        return class_name in self.denoiser_classes and bool(config.get("num_class_embeds"))

    def spec_fields(self, model) -> dict:
        rows = int(model.denoiser.config["num_class_embeds"])
        return class_spec_fields(*class_bookkeeping(model.source.spec, model.source.model_index, rows, rows - 1))


class StableDiffusion(ModelFamily):
    """Stable Diffusion 1.x/2.x: the CLIP text encoder's last hidden state is the UNet's
    cross-attention input (StableDiffusionPipeline)."""
    name = "sd-unet"
    description = "UNet2DConditionModel with one CLIP text encoder (Stable Diffusion 1.x/2.x layout)"
    denoiser_classes = ("UNet2DConditionModel",)
    kind = "text"
    text_parts = (TextEncoderPart("text_encoder", "tokenizer", ("CLIPTextModel",), CLIP_TOKENIZERS),)
    default_keep, keep_reason, roles = UNET_KEEP, UNET_KEEP_REASON, UNET_ROLES
    refused = ("class_embed_type", "num_class_embeds", "addition_embed_type")
    supported = "text via UNet2DConditionModel's cross-attention; SDXL's addition_embed_type='text_time'"

    def matches(self, class_name: str, config: dict) -> bool:
        return class_name in self.denoiser_classes and config.get("addition_embed_type") != "text_time"

    def check(self, spec: str, config: dict, index: dict) -> None:
        _refuse_options(spec, config, self.refused, self.supported)

    def denoiser_inputs(self, model) -> list[dict]:
        encoders = self.text_encoders(model)
        width = sum(e["outputs"][0]["dims"][1] for e in encoders)
        return [text_input(encoders[0]["max_length"], width)]

    def spec_fields(self, model) -> dict:
        return {"text_encoders": self.text_encoders(model), "denoiser_inputs": self.denoiser_inputs(model)}


TEXT_EMBEDS, TIME_IDS = "text_embeds", "time_ids"


class StableDiffusionXL(StableDiffusion):
    """SDXL's base UNet (StableDiffusionXLPipeline): both CLIP encoders' penultimate hidden
    states concatenated, the second encoder's pooled projection as text_embeds, and time_ids
    (original size, crop origin, target size) through add_time_proj into add_embedding."""
    name = "sdxl-unet"
    description = "UNet2DConditionModel with addition_embed_type='text_time' and two CLIP encoders (SDXL)"
    text_parts = (
        TextEncoderPart("text_encoder", "tokenizer", ("CLIPTextModel",), CLIP_TOKENIZERS, hidden="penultimate"),
        TextEncoderPart("text_encoder_2", "tokenizer_2", ("CLIPTextModelWithProjection",), CLIP_TOKENIZERS,
                        hidden="penultimate", pooled=TEXT_EMBEDS),
    )
    # Model Optimizer keeps add_embedding (the text_time embedding) in high precision too
    default_keep = (*UNET_KEEP, "add_embedding.*")
    keep_reason = "kept in float (first/last conv, time or added-condition embedding by default; see keep_patterns)"
    roles = (*UNET_ROLES, LayerRole("add_embedding.*", "added-condition embedder (text_embeds, time_ids)"))
    refused = ("class_embed_type", "num_class_embeds")
    default_guidance = 5.0   # StableDiffusionXLPipeline's
    TIME_IDS_COUNT = 6   # original (h, w), crop (top, left), target (h, w); the refiner's 5 add a score

    def matches(self, class_name: str, config: dict) -> bool:
        return class_name in self.denoiser_classes and config.get("addition_embed_type") == "text_time"

    def check(self, spec: str, config: dict, index: dict) -> None:
        super().check(spec, config, index)
        if index.get("requires_aesthetics_score"):
            raise UserError(f"--model {spec!r}: the SDXL refiner (aesthetic-score time ids) is not supported; "
                            "the SDXL base model is")

    def _time_ids(self, model) -> list[float]:
        """StableDiffusionXLPipeline's defaults: original and target size the model's native
        resolution, crop at (0, 0)."""
        factor = vae_factor(model)
        _, h, w = self.sample_shape(model.denoiser.config)
        return [float(h * factor), float(w * factor), 0.0, 0.0, float(h * factor), float(w * factor)]

    def denoiser_inputs(self, model) -> list[dict]:
        encoders = self.text_encoders(model)
        pooled = encoders[-1]["outputs"][1]["dims"]
        config = model.denoiser.config
        expected = int(config["addition_time_embed_dim"]) * self.TIME_IDS_COUNT + pooled[0]
        if int(config["projection_class_embeddings_input_dim"]) != expected:
            raise UserError(f"--model {model.source.spec!r}: the UNet's added-condition embedding takes "
                            f"{config['projection_class_embeddings_input_dim']} values, SDXL's {self.TIME_IDS_COUNT} "
                            f"time ids and {pooled[0]}-wide text_embeds make {expected}")
        return [*super().denoiser_inputs(model), {"name": TEXT_EMBEDS, "dtype": "float32", "dims": pooled},
                {"name": TIME_IDS, "dtype": "float32", "dims": [self.TIME_IDS_COUNT]}]

    def spec_fields(self, model) -> dict:
        return {**super().spec_fields(model), "constant_inputs": {TIME_IDS: self._time_ids(model)},
                # the pipeline's config: without a negative prompt the unconditional half is zeros
                "zero_uncond": bool(model.source.model_index.get("force_zeros_for_empty_prompt", True))}

    def torch_call(self, inputs: dict) -> dict:
        return {TEXT_OUTPUT: inputs[TEXT_OUTPUT],
                "added_cond_kwargs": {TEXT_EMBEDS: inputs[TEXT_EMBEDS], TIME_IDS: inputs[TIME_IDS]}}
