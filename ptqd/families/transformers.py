"""The diffusion-transformer families: DiT (DiTTransformer2DModel: patchified, adaLN-Zero,
class-conditional, learned variance; DiTPipeline) and PixArt-alpha (PixArtTransformer2DModel
with a T5 text encoder, cross-attention and adaLN-single; PixArtAlphaPipeline). Their folder
in a pipeline is transformer/, and so is their name in OUT: transformer_<cfg>.onnx."""
from __future__ import annotations

from ptqd.errors import UserError
from ptqd.families.base import (CROSS_ATTENTION_ROLES, LayerRole, ModelFamily, TextEncoderPart, class_bookkeeping, class_spec_fields,
                                text_input, vae_factor)
from ptqd.runtime.layout import CLASS_INPUT, TEXT_OUTPUT

ATTENTION_ROLES = (*(LayerRole(f"*.attn1.{leaf}", "self-attention projection")
                     for leaf in ("to_q", "to_k", "to_v", "to_out.0")),
                   LayerRole("*.ff.net.*", "MLP"))


class DiffusionTransformer(ModelFamily):
    denoiser = "transformer"
    denoiser_label = "transformer"

    def eps(self, output, sample):
        """DiT and PixArt predict eps and a variance (2C channels); DDIM reads the first C."""
        channels = sample.shape[1]
        return output[:, :channels] if output.shape[1] == 2 * channels else output


class DiT(DiffusionTransformer):
    """DiTPipeline's model. Its null class, the one guidance feeds the unconditional half, is
    num_embeds_ada_norm (1000 for ImageNet DiTs; model_index.json's null_class overrides it)."""
    name = "dit"
    description = "DiTTransformer2DModel: patchified, adaLN-Zero, class-conditional (DiT)"
    denoiser_classes = ("DiTTransformer2DModel",)
    kind = "class"
    default_guidance = 4.0   # DiTPipeline's
    # the patch embedder sees the raw latents; each block's timestep/class embedder feeds its
    # adaLN (a per-sample vector, like a UNet's time embedding); the final layer (adaLN
    # modulation and projection) produces eps directly, like conv_out
    default_keep = ("pos_embed.*", "transformer_blocks.*.norm1.emb.*", "proj_out_1", "proj_out_2")
    keep_reason = ("kept in float (patch embedder, timestep/class embedders or final layer by default; "
                   "see keep_patterns)")
    roles = (LayerRole("pos_embed.*", "patch embedder"),
             LayerRole("*.norm1.emb.timestep_embedder.*", "time embedder"),
             LayerRole("*.norm1.linear", "adaLN-Zero modulation"),
             LayerRole("proj_out_1", "final adaLN modulation"),
             LayerRole("proj_out_2", "final layer (eps and variance)"),
             *ATTENTION_ROLES)

    def spec_fields(self, model) -> dict:
        classes = int(model.denoiser.config["num_embeds_ada_norm"])
        # the label embedding holds the classes plus the dropped-label row DiT trains for guidance
        return class_spec_fields(*class_bookkeeping(model.source.spec, model.source.model_index, classes + 1,
                                                    classes))

    def torch_call(self, inputs: dict) -> dict:
        return {CLASS_INPUT: inputs[CLASS_INPUT]}


ENCODER_MASK = "encoder_attention_mask"
RESOLUTION, ASPECT_RATIO = "resolution", "aspect_ratio"
# PixArtAlphaPipeline's max_sequence_length
PIXART_TOKENS = 120


class PixArtAlpha(DiffusionTransformer):
    """PixArtAlphaPipeline's model: the T5 encoder's last hidden state (with its padding mask)
    through caption_projection into cross-attention; resolution and aspect ratio as added
    conditions when the transformer uses them (sample_size 128)."""
    name = "pixart-alpha"
    description = "PixArtTransformer2DModel with a T5 text encoder (PixArt-alpha)"
    denoiser_classes = ("PixArtTransformer2DModel",)
    kind = "text"
    text_parts = (TextEncoderPart("text_encoder", "tokenizer", ("T5EncoderModel",), ("T5Tokenizer", "T5TokenizerFast"),
                                  mask=True, max_length=PIXART_TOKENS, fp16=False),)
    prompt_preparation = "lower-strip"
    default_guidance = 4.5   # PixArtAlphaPipeline's
    # Model Optimizer's defaults keep pos_embed and the text projection (SD3's context_embedder is
    # PixArt's caption_projection); the time embedding and its adaLN-single modulation feed every
    # block, and the final projection produces eps
    default_keep = ("pos_embed.*", "adaln_single.*", "caption_projection.*", "proj_out")
    keep_reason = ("kept in float (patch embedder, adaLN-single time embedding, caption projection or final "
                   "layer by default; see keep_patterns)")
    roles = (LayerRole("pos_embed.*", "patch embedder"),
             LayerRole("adaln_single.emb.timestep_embedder.*", "time embedder"),
             LayerRole("adaln_single.emb.*", "size embedder (resolution, aspect ratio)"),
             LayerRole("adaln_single.linear", "adaLN-single modulation"),
             LayerRole("caption_projection.*", "caption projection (reads the T5 encoder's states)"),
             *CROSS_ATTENTION_ROLES,
             LayerRole("*.attn2.*", "cross-attention projection"),
             LayerRole("proj_out", "final layer (eps and variance)"),
             *ATTENTION_ROLES)

    def check(self, spec: str, config: dict, index: dict) -> None:
        if index.get("_class_name") == "PixArtSigmaPipeline":
            raise UserError(f"--model {spec!r}: PixArt-Sigma is not supported (PixArt-alpha is)")
        if config.get("caption_channels") is None:
            raise UserError(f"--model {spec!r}: a PixArtTransformer2DModel without caption_channels takes no "
                            "text; ptqd runs PixArt-alpha's text-conditioned transformer")

    def _added_conditions(self, model) -> dict:
        """PixArtAlphaPipeline's resolution [h, w] and aspect ratio [h / w] in pixels, when the
        transformer takes them."""
        if not model.denoiser.use_additional_conditions:
            return {}
        factor = vae_factor(model)
        _, h, w = (d * factor for d in self.sample_shape(model.denoiser.config))
        return {RESOLUTION: [float(h), float(w)], ASPECT_RATIO: [float(h / w)]}

    def denoiser_inputs(self, model) -> list[dict]:
        encoder = self.text_encoders(model)[0]
        length, width = encoder["outputs"][0]["dims"]
        added = [{"name": k, "dtype": "float32", "dims": [len(v)]} for k, v in self._added_conditions(model).items()]
        return [text_input(length, width), {"name": ENCODER_MASK, "dtype": "float32", "dims": [length]}, *added]

    def spec_fields(self, model) -> dict:
        return {"text_encoders": self.text_encoders(model), "denoiser_inputs": self.denoiser_inputs(model),
                "mask_input": ENCODER_MASK, "constant_inputs": self._added_conditions(model)}

    def torch_call(self, inputs: dict) -> dict:
        return {TEXT_OUTPUT: inputs[TEXT_OUTPUT], ENCODER_MASK: inputs[ENCODER_MASK],
                "added_cond_kwargs": {RESOLUTION: inputs.get(RESOLUTION), ASPECT_RATIO: inputs.get(ASPECT_RATIO)}}
