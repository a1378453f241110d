"""A pipeline's text encoder as the denoiser sees it: token ids (and a T5 encoder's attention
mask) -> the hidden states and pooled embedding the family takes from it. One torch module,
used by calibration and `ptqd sample --backend torch` and exported as the text encoder's ONNX
graph, so the deployed graph computes what calibration conditioned on."""
from __future__ import annotations

import torch

from ptqd.families.base import TextEncoderPart
from ptqd.runtime.layout import TEXT_OUTPUT


class TextEncoderOutputs(torch.nn.Module):
    """input_ids int64 [N, L] (and attention_mask [N, L]) -> (hidden states [N, L, D], and the
    pooled projection [N, P] where the family takes it), as diffusers' pipelines compute them:
    StableDiffusionPipeline the last hidden state (after CLIP's final layer norm), SDXL the
    penultimate layer's (before it) and text_encoder_2's text_embeds, PixArt-alpha T5's last
    hidden state under the padding mask."""

    def __init__(self, encoder: torch.nn.Module, part: TextEncoderPart):
        super().__init__()
        self.encoder, self.part = encoder, part

    @property
    def output_names(self) -> list[str]:
        return [TEXT_OUTPUT] + ([self.part.pooled] if self.part.pooled else [])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple:
        mask = {"attention_mask": attention_mask} if self.part.mask else {}
        penultimate = self.part.hidden == "penultimate"
        out = self.encoder(input_ids=input_ids, output_hidden_states=penultimate, return_dict=True, **mask)
        hidden = out.hidden_states[-2] if penultimate else out.last_hidden_state
        return (hidden, out.text_embeds) if self.part.pooled else (hidden,)
