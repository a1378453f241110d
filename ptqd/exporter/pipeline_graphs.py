"""Full-precision ONNX export of a latent pipeline's non-UNet parts: the text encoder (prompt
ids -> the UNet's cross-attention states) and the VAE decoder (latents -> images).

Only the UNet is quantized; these two run once per image rather than once per step, so
they ship in float: FP32, and for TensorRT an FP16 copy of the VAE decoder, the heavy one
(strongly typed builds take their precision from the graph, so an FP16 engine needs FP16
weights and math in the graph itself); the copy keeps float32 input and output, so every
runtime calls it the same way. The text encoder stays FP32 everywhere: traced in half,
transformers' CLIP mixes float32 into its residual stream (a float32 LayerNormalization input
with FP16 scale, which ONNX rejects), and it runs once per prompt batch. Same exporter settings as the UNet's graph (onnx_fp): TorchScript
exporter, opset 21, dynamic batch, one self-contained file, checked in full after writing.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from ptqd.runtime.layout import TEXT_OUTPUT, TOKENS_INPUT, VAE_INPUT, VAE_OUTPUT
from ptqd.exporter.onnx_fp import OPSET

BATCH_AXIS = "batch"


class TextEncoderForExport(torch.nn.Module):
    """input_ids int64 [N, L] -> last_hidden_state [N, L, hidden]: what StableDiffusionPipeline
    feeds the UNet (no attention mask: SD's CLIP encodes the padding too)."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids, return_dict=False)[0]


class VaeDecoderForExport(torch.nn.Module):
    """latents [N, C, h, w] (the sampler's scale) -> images [N, 3, H, W] in the model's [-1, 1]."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype   # FP16 copy: cast in, compute in FP16, cast out
        return self.vae.decode((latents / self.scaling_factor).to(dtype), return_dict=False)[0].float()


def _half(module: torch.nn.Module, half: bool) -> torch.nn.Module:
    return copy.deepcopy(module).half() if half else module


def export_text_encoder(text_encoder, path: Path, max_length: int) -> Path:
    """Write the text encoder as ONNX: `input_ids` int64 [batch, max_length] ->
    `encoder_hidden_states` float32 [batch, max_length, hidden]."""
    positions = getattr(text_encoder.config, "max_position_embeddings", max_length)
    if max_length > positions:
        raise ValueError(f"max_length {max_length} exceeds the text encoder's {positions} positions")
    # Exported with whatever attention transformers picked (SDPA by default in transformers 5):
    # the TorchScript exporter writes SDPA's is_causal as a Trilu causal mask and ONNX Runtime
    # matches PyTorch to ~1e-6, so no switch to "eager" attention is needed.
    ids = torch.zeros(2, max_length, dtype=torch.int64)
    _export(TextEncoderForExport(text_encoder).eval(), (ids,), path, TOKENS_INPUT, TEXT_OUTPUT)
    return path


def export_vae_decoder(vae, path: Path, latent_shape: tuple[int, int, int], half: bool = False) -> Path:
    """Write the VAE decoder as ONNX: `latents` float32 [batch, *latent_shape] ->
    `images` float32 [batch, 3, H, W], in [-1, 1] (the caller maps to [0, 1]); half: FP16
    weights and math."""
    latents = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(0))
    _export(VaeDecoderForExport(_half(vae, half)).eval(), (latents,), path, VAE_INPUT, VAE_OUTPUT)
    return path


def _export(module: torch.nn.Module, inputs: tuple, path: Path, input_name: str, output_name: str) -> None:
    import onnx

    from ptqd.exporter.graph_io import export_torch

    dynamic = {input_name: {0: BATCH_AXIS}, output_name: {0: BATCH_AXIS}}

    def export(file: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
            torch.onnx.export(module, inputs, str(file), input_names=[input_name], output_names=[output_name],
                              opset_version=OPSET, dynamic_axes=dynamic, dynamo=False,
                              do_constant_folding=True)

    export_torch(export, path)
    onnx.checker.check_model(str(path), full_check=True)
