"""PromptTokenizer (tokenizers + numpy only) against transformers' CLIPTokenizer as
StableDiffusionPipeline calls it."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ptqd.builtin.tiny_pipelines import BOS_TOKEN, EOS_TOKEN, MAX_LENGTH, build_tokenizer, write_bpe_files
from ptqd.exporter.tokenizer_files import save_prompt_tokenizer
from ptqd.runtime.tokenizer import SETTINGS_FILE, TOKENIZER_FILE, PromptTokenizer

SD_MAX_LENGTH = 77
PROMPTS = [
    "",
    "a cat",
    "The Quick BROWN Fox",
    "the " * 100,  # longer than 77 tokens: truncated, EOS kept last
    "a" * 200,  # one long word, many BPE pieces
    "  leading,\ttabs\nand   newlines  ",
    "Ünïcödé café naïve 日本語 🐱 👩‍👩‍👧",
    "ﬁ ligature, ＡＢＣ fullwidth, e\u0301 combining",
    "don't you're it's I'LL we've",
    "123 4.56 $%^&* (parens) [brackets]",
    f"{EOS_TOKEN} typed in a prompt {BOS_TOKEN}",
]


def sd_style_folder(folder, pad_token):
    """A tokenizer/ folder as Stable Diffusion ships it: vocab.json + merges.txt + config, no tokenizer.json.
    pad "<|endoftext|>" is SD 1.x's choice, "!" SD 2.x's (a pad id different from EOS)."""
    write_bpe_files(folder)
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": SD_MAX_LENGTH, "pad_token": pad_token,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": pad_token}))
    return folder


def saved_and_reloaded(tokenizer, folder):
    from transformers import CLIPTokenizer

    tokenizer.save_pretrained(str(folder))
    return CLIPTokenizer.from_pretrained(str(folder))


KINDS = {"tiny": MAX_LENGTH, "sd1-files": SD_MAX_LENGTH, "sd2-files": SD_MAX_LENGTH, "77-roundtrip": SD_MAX_LENGTH}


@pytest.fixture(scope="module", params=list(KINDS))
def hf_tokenizer(request, tmp_path_factory):
    """The tiny pipeline's tokenizer; SD 1.x- and 2.x-style vocab.json/merges.txt folders;
    a 77-token one through save_pretrained/from_pretrained (transformers 5 writes tokenizer.json)."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "tiny":
        tokenizer = build_tokenizer()
    elif request.param == "77-roundtrip":
        tokenizer = saved_and_reloaded(build_tokenizer(SD_MAX_LENGTH), folder)
    else:
        pad = EOS_TOKEN if request.param == "sd1-files" else "!"
        tokenizer = CLIPTokenizer.from_pretrained(str(sd_style_folder(folder, pad)))
        assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == (pad == EOS_TOKEN)
    assert tokenizer.model_max_length == KINDS[request.param]
    return tokenizer


@pytest.fixture(scope="module")
def prompt_tokenizer_folder(hf_tokenizer, tmp_path_factory):
    return save_prompt_tokenizer(hf_tokenizer, tmp_path_factory.mktemp("prompt_tokenizer"))


def diffusers_ids(tokenizer, prompts):
    """Exactly StableDiffusionPipeline.encode_prompt's call."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True).input_ids


def test_matches_transformers_on_tricky_prompts(hf_tokenizer, prompt_tokenizer_folder):
    expected = np.array(diffusers_ids(hf_tokenizer, PROMPTS), dtype=np.int64)
    got = PromptTokenizer.from_folder(prompt_tokenizer_folder)(PROMPTS)
    assert got.dtype == np.int64
    assert got.shape == (len(PROMPTS), hf_tokenizer.model_max_length)
    np.testing.assert_array_equal(got, expected)
    # and one prompt at a time, as the unconditional "" of classifier-free guidance is encoded
    for prompt, row in zip(PROMPTS, expected):
        np.testing.assert_array_equal(PromptTokenizer.from_folder(prompt_tokenizer_folder)([prompt])[0], row)


def test_cases_cover_padding_and_truncation(hf_tokenizer):
    """Guard on the test itself: the prompts do reach both ends of max_length."""
    ids = diffusers_ids(hf_tokenizer, PROMPTS)
    eos, pad = hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id
    assert ids[0][:2] == [hf_tokenizer.bos_token_id, eos] and ids[0][-1] == pad
    long_rows = [row for row in ids if row[-1] == eos and row[-2] != pad]
    assert len(long_rows) >= 2


def test_saving_leaves_the_transformers_tokenizer_unchanged(hf_tokenizer, tmp_path):
    # transformers leaves the last call's padding/truncation on its backend; saving must not
    # add its own on top of whatever the caller's tokenizer currently holds.
    backend = hf_tokenizer.backend_tokenizer
    before = backend.padding, backend.truncation, backend.encode_special_tokens
    folder = save_prompt_tokenizer(hf_tokenizer, tmp_path / "tok")
    assert (backend.padding, backend.truncation, backend.encode_special_tokens) == before
    assert {p.name for p in folder.iterdir()} == {TOKENIZER_FILE, SETTINGS_FILE}


def test_runs_without_torch_or_transformers(tmp_path):
    """The Triton Python backend has numpy and tokenizers only: import and run with the others blocked."""
    folder = save_prompt_tokenizer(build_tokenizer(), tmp_path / "tok")
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "diffusers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from ptqd.runtime.tokenizer import PromptTokenizer
        ids = PromptTokenizer.from_folder({str(folder)!r})(["a cat", ""])
        print(ids.dtype, *ids.shape)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["int64", "2", str(MAX_LENGTH)]


def test_input_checks(tmp_path):
    tokenizer = PromptTokenizer.from_folder(save_prompt_tokenizer(build_tokenizer(), tmp_path / "tok"))
    assert tokenizer([]).shape == (0, MAX_LENGTH)
    with pytest.raises(TypeError):
        tokenizer("a cat")  # a bare string would be a batch of characters
    with pytest.raises(TypeError):
        tokenizer(["a cat", None])
