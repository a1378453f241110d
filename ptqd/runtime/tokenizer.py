"""Prompt -> token ids (and attention mask) at serving time, identical to what diffusers'
pipelines feed their text encoders (CLIP for Stable Diffusion and SDXL, T5 for PixArt-alpha).

diffusers' StableDiffusionPipeline tokenizes with

    tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
              truncation=True).input_ids

PromptTokenizer reproduces that with the `tokenizers` package alone (plus numpy), because
it runs inside the Triton Python backend, whose environment has neither torch nor
transformers. The files it reads are written at export time (ptqd.exporter.tokenizer_files):
tokenizer.json, the CLIP tokenizer's backend, and tokenizer_settings.json, the padding and
truncation that transformers applies per call rather than storing in the backend.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
SETTINGS_FILE = "tokenizer_settings.json"
SETTINGS_FORMAT = 1


@dataclass(frozen=True)
class TokenizerSettings:
    """What transformers passes to the backend on each call (set_truncation_and_padding)."""
    max_length: int
    pad_token_id: int
    pad_token: str
    pad_type_id: int = 0
    padding_side: str = "right"
    truncation_side: str = "right"
    # transformers' split_special_tokens: False means "<|endoftext|>" typed in a prompt is
    # the special token, not the characters.
    split_special_tokens: bool = False
    format: int = SETTINGS_FORMAT

    @classmethod
    def read(cls, path: Path) -> TokenizerSettings:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != SETTINGS_FORMAT:
            raise ValueError(f"{path}: unsupported tokenizer settings format {data.get('format')!r} "
                             f"(expected {SETTINGS_FORMAT})")
        return cls(**data)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")


def configure(tokenizer, settings: TokenizerSettings):
    """Fix the backend's truncation and padding to a constant [max_length] per prompt.

    Truncation counts the BOS/EOS the post-processor adds, like transformers' truncation=True
    ("longest_first"), so an over-long prompt keeps its EOS as the last id.
    """
    tokenizer.enable_truncation(max_length=settings.max_length, stride=0, strategy="longest_first",
                                direction=settings.truncation_side)
    tokenizer.enable_padding(direction=settings.padding_side, pad_id=settings.pad_token_id,
                             pad_type_id=settings.pad_type_id, pad_token=settings.pad_token,
                             length=settings.max_length, pad_to_multiple_of=None)
    tokenizer.encode_special_tokens = settings.split_special_tokens
    return tokenizer


class PromptTokenizer:
    """Callable: list of prompts -> int64 token ids [N, max_length]."""

    def __init__(self, tokenizer, settings: TokenizerSettings):
        self.settings = settings
        self.tokenizer = configure(tokenizer, settings)

    @classmethod
    def from_folder(cls, folder: Path) -> PromptTokenizer:
        from tokenizers import Tokenizer

        folder = Path(folder)
        settings = TokenizerSettings.read(folder / SETTINGS_FILE)
        return cls(Tokenizer.from_file(str(folder / TOKENIZER_FILE)), settings)

    @property
    def max_length(self) -> int:
        return self.settings.max_length

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        return self.encode(prompts)[0]

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64 [N, max_length] each; the mask is 1 on the
        prompt's tokens, 0 on the padding (what a T5 encoder and PixArt's transformer read)."""
        # A bare string would be tokenized as a batch of its characters: refuse it outright.
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("PromptTokenizer expects a list of prompt strings")
        if len(prompts) == 0:
            empty = np.zeros((0, self.max_length), dtype=np.int64)
            return empty, empty.copy()
        encodings = self.tokenizer.encode_batch(list(prompts), add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        if ids.shape != (len(prompts), self.max_length):
            raise ValueError(f"tokenizer produced ids of shape {ids.shape}, expected "
                             f"{(len(prompts), self.max_length)}")
        return ids, np.array([e.attention_mask for e in encodings], dtype=np.int64)
