"""Tiny random-weight conditional latent diffusion pipelines, built in code.

    python -m ptqd.builtin.tiny_pipelines --kind text --output tiny-sd
    python -m ptqd.builtin.tiny_pipelines --kind class --output tiny-ldm

They exist so that tests, and users without a download, can drive the conditional path
(prompt -> text encoder -> cross-attention UNet -> VAE decoder, or class label -> UNet ->
VAE decoder) end to end in seconds. The weights are random: the images are noise, but
every shape, file and config is what a real pipeline of the same layout has.

- "text": a Stable Diffusion folder (StableDiffusionPipeline.save_pretrained) with a CLIP
  tokenizer whose byte-level BPE vocabulary is written here, so nothing is downloaded.
- "class": an LDM-style class-conditional folder (UNet2DModel with a class embedding, the
  same VAE and scheduler) whose model_index.json also records the number of classes and
  the "null" class used for the unconditional half of classifier-free guidance.

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

KINDS = ("text", "class")
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


def build_tokenizer(max_length: int = MAX_LENGTH):
    """A CLIPTokenizer over the local vocabulary, padding/truncating prompts to max_length."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_bpe_files(Path(tmp))
        # transformers 5 reads both files into the tokenizers backend here: nothing refers
        # to the temporary folder afterwards.
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)


# --- models -----------------------------------------------------------------------------------

def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def build_text_unet(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
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


SAVERS = {"text": save_text_pipeline, "class": save_class_pipeline}


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
                             "class: class-conditional UNet (10 classes + null class).")
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
