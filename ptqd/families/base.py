"""What a model family is: the one place that says how a kind of diffusers pipeline is found
in a folder, where its denoiser lives and how it is called, what conditions it, what comes out
of it, and what its layers do. Every stage asks the family (ptqd.families.detect,
family_of_module) instead of testing class names of its own.

A family is a stateless object; what depends on a particular model (its sample size, its
classes, its text encoders' widths) is read from the configs and components it is given.
Torch and diffusers are imported only by the methods that run a model.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from ptqd.errors import UserError
from ptqd.runtime.layout import CLASS_INPUT, DEFAULT_DENOISER, TEXT_OUTPUT

@dataclass(frozen=True)
class TextEncoderPart:
    """One text encoder of a pipeline, and what the denoiser takes from it."""
    component: str                 # its folder in the pipeline: text_encoder, text_encoder_2
    tokenizer: str                 # its tokenizer's folder: tokenizer, tokenizer_2
    classes: tuple[str, ...]       # the transformers classes it may be (model_index.json names one)
    tokenizer_classes: tuple[str, ...]
    hidden: str = "last"           # "last": last_hidden_state; "penultimate": hidden_states[-2]
    pooled: str | None = None      # the denoiser input its pooled projection feeds (SDXL: text_embeds)
    mask: bool = False             # the encoder reads the tokenizer's attention mask (T5)
    max_length: int | None = None  # tokens per prompt; None: the tokenizer's model_max_length
    # TensorRT builds an FP16 copy of its graph (exporter.fp16); False keeps FP32 where FP16
    # cannot hold the encoder (T5: its attention bias uses float32's lowest value, and T5's
    # activations are known to overflow FP16)
    fp16: bool = True


@dataclass(frozen=True)
class LayerRole:
    """A layer pattern (fnmatch over module names) and what the layer does."""
    pattern: str
    role: str


# the layers that read the text encoder's states (UNets' attn2 and PixArt's)
CROSS_ATTENTION_ROLES = tuple(LayerRole(f"*.attn2.{leaf}", "cross-attention projection (reads the text encoder's "
                                        "states)") for leaf in ("to_k", "to_v"))


class ModelFamily:
    """The interface; each family in ptqd/families/ fills it in."""
    name: str = ""                              # registry key, recorded in pipeline.json
    description: str = ""
    denoiser: str = DEFAULT_DENOISER            # the denoiser's folder, and graph / model name stem
    denoiser_label: str = "UNet"                # what messages call it
    denoiser_classes: tuple[str, ...] = ()      # the diffusers classes it takes
    kind: str = "unconditional"                 # what conditions it: "unconditional", "class" or "text"
    text_parts: tuple[TextEncoderPart, ...] = ()
    prompt_preparation: str = ""                # runtime.conditioning.PROMPT_PREPARATION key
    default_guidance: float | None = None       # its pipeline's default scale (None: ptqd's per kind)
    # layers kept in float unless --keep says otherwise, and why (the precision plan says so)
    default_keep: tuple[str, ...] = ()
    keep_reason: str = ""
    # roles in the order they are tried; the first pattern that matches wins
    roles: tuple[LayerRole, ...] = ()

    # --- detection, from configs alone (no torch) ------------------------------------------
    def matches(self, class_name: str, config: dict) -> bool:
        """Is a denoiser of this class and config one of this family's?"""
        return class_name in self.denoiser_classes

    def check(self, spec: str, config: dict, index: dict) -> None:
        """Refuse, in one UserError, options of the denoiser ptqd does not produce inputs for."""

    # --- shapes and conditioning ---------------------------------------------------------------
    def sample_shape(self, config) -> list[int]:
        """[C, H, W] of the denoiser's sample."""
        size = config["sample_size"]
        size = size if isinstance(size, int) else size[0]
        return [int(config["in_channels"]), int(size), int(size)]

    def denoiser_inputs(self, model) -> list[dict]:
        """The graph inputs after sample and timestep: [{name, dtype, dims}] (dims per sample)."""
        return []

    def spec_fields(self, model) -> dict:
        """The family's part of the PipelineSpec (runtime.conditioning) of a loaded model."""
        return {}

    def torch_call(self, inputs: dict) -> dict:
        """The denoiser's keyword arguments for the graph's conditioning inputs (SDXL and PixArt
        nest theirs in added_cond_kwargs)."""
        return dict(inputs)

    def forward(self, module, sample, timestep, **inputs):
        """eps for (sample, timestep, conditioning): the diffusers call, then its output as eps."""
        return self.eps(module(sample, timestep=timestep, **self.torch_call(inputs)).sample, sample)

    def eps(self, output, sample):
        """The denoiser's output as eps (a learned-variance transformer's first C channels)."""
        return output

    def text_encoders(self, model) -> list[dict]:
        """PipelineSpec.text_encoders of a loaded model: per text part, its tokenizer's length
        and the width of what it feeds the denoiser."""
        entries = []
        for part in self.text_parts:
            config = model.text_encoders[part.component].config
            length = part.max_length or int(model.tokenizers[part.tokenizer].model_max_length)
            outputs = [{"name": TEXT_OUTPUT, "dims": [length, int(config.hidden_size)]}]
            if part.pooled:
                outputs.append({"name": part.pooled, "dims": [int(config.projection_dim)]})
            entries.append({"name": part.component, "tokenizer": part.tokenizer, "max_length": length,
                            "mask": part.mask, "fp16": part.fp16, "outputs": outputs})
        return entries

    # --- layers -------------------------------------------------------------------------------
    def layer_role(self, name: str, kind: str) -> str:
        """What a Conv2d ("conv") or Linear ("linear") layer does in this family's denoiser."""
        for role in self.roles:
            if fnmatch.fnmatchcase(name, role.pattern):
                return role.role
        return "convolution" if kind == "conv" else "linear"


def vae_factor(model) -> int:
    """Image pixels per latent pixel (1 for a pixel-space model), as diffusers' pipelines count them."""
    return 2 ** (len(model.vae.config.block_out_channels) - 1) if model.vae is not None else 1


def class_bookkeeping(spec: str, index: dict, rows: int, null_default: int) -> tuple[int, int]:
    """(number of real classes, the null class) of a class-conditional denoiser whose label
    embedding has `rows` rows: model_index.json's "null_class" (default `null_default`) is the
    unconditional label of classifier-free guidance, and the real classes are its "num_classes",
    or every label below the null class."""
    try:
        null = int(index.get("null_class", null_default))
        count = int(index.get("num_classes", null))
    except (TypeError, ValueError):
        raise UserError(f"--model {spec!r}: model_index.json's null_class/num_classes are not integers") from None
    if not 0 <= null < rows or not 1 <= count <= rows or null < count:
        raise UserError(f"--model {spec!r}: null class {null} with {count} classes does not fit the "
                        f"denoiser's {rows} class embeddings (the null class must follow the real classes)")
    return count, null


def class_spec_fields(count: int, null: int) -> dict:
    return {"num_classes": count, "null_class": null,
            "denoiser_inputs": [{"name": CLASS_INPUT, "dtype": "int64", "dims": []}],
            "default_conditions": list(range(count))}


def text_input(length: int, width: int) -> dict:
    return {"name": TEXT_OUTPUT, "dtype": "float32", "dims": [length, width]}
