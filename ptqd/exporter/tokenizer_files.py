"""The export side of the prompt tokenizer: a transformers CLIP tokenizer saved as the files
ptqd.runtime.tokenizer.PromptTokenizer reads at serving time. transformers 5 keeps a
`tokenizers.Tokenizer` behind every CLIPTokenizer: it is copied to tokenizer.json, and the
padding and truncation transformers applies per call go to tokenizer_settings.json."""
from __future__ import annotations

from pathlib import Path

from ptqd.runtime.tokenizer import SETTINGS_FILE, TOKENIZER_FILE, TokenizerSettings, configure


def save_prompt_tokenizer(hf_tokenizer, folder: Path, max_length: int | None = None) -> Path:
    """Write tokenizer.json + tokenizer_settings.json for PromptTokenizer from a transformers
    (fast, i.e. tokenizers-backed) CLIP tokenizer; max_length defaults to its model_max_length.
    """
    from tokenizers import Tokenizer

    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"{type(hf_tokenizer).__name__} has no tokenizers backend to save")
    settings = settings_of(hf_tokenizer, max_length)
    # A copy through JSON: configuring padding on the live backend would change the caller's
    # tokenizer for every later call that does not pass padding itself.
    copy = configure(Tokenizer.from_str(backend.to_str()), settings)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copy.save(str(folder / TOKENIZER_FILE))
    settings.write(folder / SETTINGS_FILE)
    return folder


def settings_of(hf_tokenizer, max_length: int | None = None) -> TokenizerSettings:
    length = max_length if max_length is not None else hf_tokenizer.model_max_length
    # transformers uses a huge sentinel (int(1e30)) for "no limit"; SD always has a real one.
    if not isinstance(length, int) or not 0 < length <= 1_000_000:
        raise ValueError(f"tokenizer has no usable model_max_length ({length!r}); pass max_length")
    if hf_tokenizer.pad_token_id is None:
        raise ValueError(f"{type(hf_tokenizer).__name__} has no pad token; padding to max_length needs one")
    return TokenizerSettings(
        max_length=length, pad_token_id=int(hf_tokenizer.pad_token_id), pad_token=str(hf_tokenizer.pad_token),
        pad_type_id=int(hf_tokenizer.pad_token_type_id), padding_side=hf_tokenizer.padding_side,
        truncation_side=hf_tokenizer.truncation_side,
        split_special_tokens=bool(getattr(hf_tokenizer, "split_special_tokens", False)),
    )
