"""Tiny random-weight conditional latent diffusion pipelines, built in code.

    python -m ptqd.builtin.tiny_pipelines --kind text --output tiny-sd
    python -m ptqd.builtin.tiny_pipelines --kind class --output tiny-ldm
    python -m ptqd.builtin.tiny_pipelines --kind sdxl --output tiny-sdxl      # or dit, pixart

They exist so that tests, and users without a download, can drive each model family's path
(prompt -> text encoders -> cross-attention denoiser -> VAE decoder, or class label ->
denoiser -> VAE decoder) end to end in seconds. The weights are random: the images are
noise, but every shape, file and config is what a real pipeline of the same layout has,
saved by the diffusers pipeline class itself where one fits.

- "text": a Stable Diffusion folder (StableDiffusionPipeline) with a CLIP tokenizer whose
  byte-level BPE vocabulary is written here, so nothing is downloaded.
- "class": an LDM-style class-conditional folder (UNet2DModel with a class embedding, the
  same VAE and scheduler) whose model_index.json also records the number of classes and
  the "null" class used for the unconditional half of classifier-free guidance.
- "sdxl": StableDiffusionXLPipeline: two CLIP text encoders (the second with a projection,
  its tokenizer padding with "!" as SDXL's does), a UNet with addition_embed_type="text_time",
  and SDXL's Euler scheduler config (ptqd runs DDIM from it).
- "dit": DiTPipeline: a DiTTransformer2DModel with learned variance (8 output channels for 4
  latent ones) and ImageNet's 1000 classes, whose null class 1000 DiTPipeline guides with.
- "pixart": PixArtAlphaPipeline: a T5 encoder with a Unigram vocabulary written here, a
  PixArtTransformer2DModel with learned variance, and PixArt's DPM-Solver scheduler config.

Latents are 4x8x8 and decode to 3x16x16 images.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from ptqd.errors import UserError

KINDS = ("text", "class", "sdxl", "dit", "pixart")
LATENT_CHANNELS = 4
LATENT_SIZE = 8
IMAGE_SIZE = 16
MAX_LENGTH = 16
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # LDM's convention: the extra last class embedding means "no class"
CLASS_PIPELINE_NAME = "PTQDClassConditionalPipeline"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# A few frequent English letter pairs, so that prompts exercise BPE merges and not only
# single bytes. Order is merge priority; each merged token is added to the vocabulary.
MERGES = (("t", "h"), ("th", "e</w>"), ("i", "n"), ("a", "n"), ("e", "r</w>"), ("o", "n</w>"),
          ("a", "t</w>"), ("e", "n"), ("r", "e"), ("o", "f</w>"))


# --- tokenizer --------------------------------------------------------------------------------

def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, soft hyphen)
    are moved to chr(256 + k) so that every vocabulary entry is a visible string.
    transformers 5 no longer exports its copy of this table, hence this one.
    """
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in CLIP's layout: bytes, bytes + "</w>", merged pairs, then the specials."""
    chars = list(byte_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(pair) for pair in MERGES), BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, list(MERGES)


def write_bpe_files(folder: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt, the files a real Stable Diffusion tokenizer/ ships."""
    vocab, merges = bpe_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_file, merges_file


def build_tokenizer(max_length: int = MAX_LENGTH, pad_token: str = EOS_TOKEN):
    """A CLIPTokenizer over the local vocabulary, padding/truncating prompts to max_length
    (SDXL's second tokenizer pads with "!" instead of the end-of-text token)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_bpe_files(Path(tmp))
        # transformers 5 reads both files into the tokenizers backend here: nothing refers
        # to the temporary folder afterwards.
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length, pad_token=pad_token)


# T5's layout: <pad> 0, </s> 1, <unk> 2, then sentencepiece pieces ("▁" starts a word)
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
T5_WORDS = ("a", "the", "of", "in", "on", "and", "red", "blue", "green", "cube", "sphere", "tree", "cat", "dog",
            "photo", "painting", "city", "night", "house", "sky")
PIXART_TOKENS = 120   # PixArtAlphaPipeline's max_sequence_length


def build_t5_tokenizer():
    """A T5Tokenizer (Unigram) over a vocabulary written here: whole words, then single
    characters, so any prompt tokenizes; scores favour the longer pieces."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    pieces = [(f"\u2581{w}", -2.0 - i * 0.01) for i, w in enumerate(T5_WORDS)]
    pieces += [("\u2581", -3.0)] + [(c, -6.0 - i * 0.001) for i, c in enumerate(chars)]
    vocab = [(t, 0.0) for t in T5_SPECIALS] + pieces
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=PIXART_TOKENS)


# --- models -----------------------------------------------------------------------------------

def build_text_encoder(tokenizer, projection: bool = False):
    """A CLIP text encoder; projection: SDXL's second one (CLIPTextModelWithProjection), whose
    pooled text_embeds condition the UNet too."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=32,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def build_t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def build_text_unet(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def build_sdxl_unet(cross_attention_dim: int, pooled_dim: int):
    from diffusers import UNet2DConditionModel

    # SDXL's layout at toy size: text_time added conditions (6 time ids of 8 sinusoids each plus
    # the pooled text embedding), linear projections, two transformer layers in the deeper block
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(4, 8), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + pooled_dim,
        cross_attention_dim=cross_attention_dim, norm_num_groups=8,
    ).eval()


def build_dit():
    from diffusers import DiTTransformer2DModel

    # learned variance (out 2 x 4 channels) and ImageNet's 1000 classes, as DiT-XL/2 has them
    return DiTTransformer2DModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=2 * LATENT_CHANNELS, num_layers=2,
        patch_size=2, attention_head_dim=16, num_attention_heads=2, num_embeds_ada_norm=1000,
        norm_num_groups=8,
    ).eval()


def build_pixart(caption_channels: int):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=LATENT_SIZE, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=caption_channels, in_channels=LATENT_CHANNELS, cross_attention_dim=24,
        out_channels=2 * LATENT_CHANNELS, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()


def build_class_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=NUM_CLASSES + 1,
    ).eval()


def build_vae():
    from diffusers import AutoencoderKL

    # Two blocks: one 2x downsampling, so 16x16 images <-> 8x8 latents.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=IMAGE_SIZE,
    ).eval()


def build_scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion's own schedule, so step/timestep handling matches the real thing.
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


# --- folders ----------------------------------------------------------------------------------

def save_text_pipeline(folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    pipe = StableDiffusionPipeline(
        vae=build_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=build_text_unet(text_encoder.config.hidden_size), scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def save_class_pipeline(folder: Path) -> None:
    import diffusers

    # No diffusers pipeline class fits (LDMPipeline is unconditional), so each component is
    # saved alone and model_index.json is written here, with the class bookkeeping in it.
    components = {"unet": build_class_unet(), "vae": build_vae(), "scheduler": build_scheduler()}
    for name, component in components.items():
        component.save_pretrained(folder / name)
    index = {
        "_class_name": CLASS_PIPELINE_NAME,
        "_diffusers_version": diffusers.__version__,
        **{name: ["diffusers", type(component).__name__] for name, component in components.items()},
        "num_classes": NUM_CLASSES,
        "null_class": NULL_CLASS,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _patch_json(path: Path, **values) -> None:
    doc = json.loads(path.read_text())
    doc.update(values)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def save_sdxl_pipeline(folder: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer(pad_token="!")
    text_encoder, text_encoder_2 = build_text_encoder(tokenizer), build_text_encoder(tokenizer_2, projection=True)
    width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    pipe = StableDiffusionXLPipeline(
        vae=build_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=build_sdxl_unet(width, text_encoder_2.config.projection_dim),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    # SDXL's published scheduler config keeps these keys of SD's; DDIM reads them from it
    _patch_json(folder / "scheduler" / "scheduler_config.json", clip_sample=False, set_alpha_to_one=False)


def save_dit_pipeline(folder: Path) -> None:
    from diffusers import DDIMScheduler, DiTPipeline

    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    DiTPipeline(transformer=build_dit(), vae=build_vae(), scheduler=scheduler).save_pretrained(folder)


def save_pixart_pipeline(folder: Path) -> None:
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    tokenizer = build_t5_tokenizer()
    text_encoder = build_t5_encoder(tokenizer)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=build_vae(), scheduler=scheduler,
                        transformer=build_pixart(text_encoder.config.d_model)).save_pretrained(folder)


SAVERS = {"text": save_text_pipeline, "class": save_class_pipeline, "sdxl": save_sdxl_pipeline,
          "dit": save_dit_pipeline, "pixart": save_pixart_pipeline}


@contextlib.contextmanager
def quiet_libraries():
    """Silence diffusers/transformers logging, progress bars and Python warnings, then restore
    the caller's settings.

    What this hides: transformers' "torchvision is not installed" notice when the Stable
    Diffusion pipeline module imports CLIP's image processor, and the "Writing model shards"
    bar that transformers 5 shows even for a single small safetensors file.
    """
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    verbosity = dlogging.get_verbosity(), tlogging.get_verbosity()
    bars = dlogging.is_progress_bar_enabled(), tlogging.is_progress_bar_enabled()
    for lib in (dlogging, tlogging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, level, bar in zip((dlogging, tlogging), verbosity, bars):
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()


def build_tiny_pipeline(kind: str, folder: Path, seed: int = 0) -> Path:
    """Build the `kind` pipeline with weights drawn from `seed` and save it as `folder`.

    The folder is written next to its destination and renamed into place, so an interrupted
    build leaves nothing half-written behind. An existing non-empty folder is refused.
    """
    if kind not in SAVERS:
        raise UserError(f"unknown tiny pipeline kind {kind!r} (choose from {', '.join(KINDS)})")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"{folder} already exists and is not an empty folder; choose a new --output")
    import torch

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would otherwise stick to the result
        # fork_rng: the seed decides the weights without disturbing the caller's generator.
        with quiet_libraries(), torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            SAVERS[kind](staging)
        os.replace(staging, folder)  # rename() onto an empty directory replaces it
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ptqd.builtin.tiny_pipelines",
                                     description="Save a tiny random-weight conditional latent "
                                                 "diffusion pipeline (no download needed).")
    parser.add_argument("--kind", choices=KINDS, required=True,
                        help="text: Stable Diffusion layout with a CLIP text encoder; "
                             "class: class-conditional UNet (10 classes + null class); sdxl: SDXL layout with "
                             "two CLIP encoders; dit: DiT (1000 classes); pixart: PixArt-alpha with a T5 encoder.")
    parser.add_argument("--output", type=Path, required=True, help="New (or empty) folder to write.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random weights.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = build_tiny_pipeline(args.kind, args.output, seed=args.seed)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
