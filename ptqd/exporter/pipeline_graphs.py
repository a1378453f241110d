"""Full-precision ONNX export of a pipeline's parts around the denoiser: its text encoders
(prompt ids -> what the denoiser takes from them: hidden states, SDXL's pooled text_embeds)
and the VAE decoder (latents -> images).

Only the denoiser is quantized; these run once per image rather than once per step, so
they ship in float: FP32, and for TensorRT an FP16 copy of the VAE decoder, the heavy one
(strongly typed builds take their precision from the graph, so an FP16 engine needs FP16
weights and math in the graph itself); the copy keeps float32 input and output, so every
runtime calls it the same way. A text encoder is not traced in half (transformers' CLIP mixes
float32 into its residual stream: a float32 LayerNormalization input with FP16 scale, which
ONNX rejects); its FP32 graph is converted instead (exporter.stage.fp16_copy, the pass the
denoiser's TensorRT graph goes through), except a T5 encoder's, which stays FP32. Same
exporter settings as the denoiser's graph (onnx_fp): TorchScript exporter, opset 21, dynamic
batch, one self-contained file (external data past 2 GiB), checked in full after writing.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from ptqd.exporter.onnx_fp import OPSET
from ptqd.families.text_encoders import TextEncoderOutputs
from ptqd.runtime.layout import MASK_INPUT, TOKENS_INPUT, VAE_INPUT, VAE_OUTPUT

BATCH_AXIS = "batch"


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


def export_text_encoder(module: TextEncoderOutputs, path: Path, max_length: int) -> Path:
    """Write a text encoder (families.text_encoders) as ONNX: `input_ids` int64 [batch,
    max_length] (and a T5 encoder's `attention_mask`, the same shape) -> what the denoiser takes
    from it, each output named after the denoiser input it feeds: `encoder_hidden_states`
    float32 [batch, max_length, hidden] (and SDXL's `text_embeds` [batch, projection])."""
    positions = getattr(module.encoder.config, "max_position_embeddings", max_length)
    if max_length > positions:
        raise ValueError(f"max_length {max_length} exceeds the text encoder's {positions} positions")
    # Exported with whatever attention transformers picked (SDPA by default in transformers 5):
    # the TorchScript exporter writes SDPA's is_causal as a Trilu causal mask and ONNX Runtime
    # matches PyTorch to ~1e-6, so no switch to "eager" attention is needed.
    ids = torch.zeros(2, max_length, dtype=torch.int64)
    inputs = (ids, torch.ones_like(ids)) if module.part.mask else (ids,)
    names = [TOKENS_INPUT, MASK_INPUT][:len(inputs)]
    with torch.no_grad():
        dims = {name: list(out.shape[1:]) for name, out in zip(module.output_names, module(*inputs))}
    _export(module.eval(), inputs, path, names, module.output_names, dims)
    return path


def export_vae_decoder(vae, path: Path, latent_shape: tuple[int, int, int], half: bool = False) -> Path:
    """Write the VAE decoder as ONNX: `latents` float32 [batch, *latent_shape] ->
    `images` float32 [batch, 3, H, W], in [-1, 1] (the caller maps to [0, 1]); half: FP16
    weights and math."""
    latents = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(0))
    _export(VaeDecoderForExport(_half(vae, half)).eval(), (latents,), path, [VAE_INPUT], [VAE_OUTPUT])
    return path


def _export(module: torch.nn.Module, inputs: tuple, path: Path, input_names: list[str],
            output_names: list[str], output_dims: dict[str, list[int]] | None = None) -> None:
    import onnx

    from ptqd.exporter.graph_io import export_torch

    dynamic = {name: {0: BATCH_AXIS} for name in (*input_names, *output_names)}

    def export(file: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
            torch.onnx.export(module, inputs, str(file), input_names=input_names, output_names=output_names,
                              opset_version=OPSET, dynamic_axes=dynamic, dynamo=False,
                              do_constant_folding=True)

    export_torch(export, path, output_dims)
    onnx.checker.check_model(str(path), full_check=True)
