"""Conditional models at run time: what conditions each image (a prompt or a class label),
classifier-free guidance around any UNet engine, and the VAE decode after the last step.

`pipeline.json` (OUT/scheduler, copied into the Triton repository) describes the model's
conditioning; everything here needs numpy only, so the Triton sampler imports it as is.

Guidance wraps an engine that takes conditioning inputs into a plain (sample, timestep)
engine, so the denoising loop and the folded PTQD schedule are the same for every model:

    eps = eps(x, t, uncond) + s * (eps(x, t, cond) - eps(x, t, uncond))

evaluated as one batch [uncond; cond] of 2N, as diffusers' pipelines do. PTQD's statistics
are measured on this guided eps (PTQD.md §2), so the folded corrections apply to it.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ptqd.runtime.layout import CLASS_INPUT, DEFAULT_DENOISER, MASK_INPUT, SPEC_FILE, TEXT_OUTPUT, TOKENS_INPUT

# the denoiser's conditioning inputs: class labels, or the text encoders' outputs
TEXT_INPUT = TEXT_OUTPUT
FORMAT_VERSION = 2
# how a family prepares a prompt before its tokenizer sees it (PixArt-alpha's pipeline lowercases
# and strips prompts when it does not clean them with bs4/ftfy)
PROMPT_PREPARATION = {"": lambda p: p, "lower-strip": lambda p: p.lower().strip()}


@dataclass
class PipelineSpec:
    """How a model is conditioned and decoded; saved as OUT/scheduler/pipeline.json.

    text_encoders: one entry per text encoder, in the order their outputs are concatenated:
    {name (graph, Triton model), tokenizer (folder in OUT/scheduler), max_length, mask (the graph
    takes attention_mask), outputs: [{name (the denoiser input it feeds), dims}]}. Outputs of the
    same name from several encoders are concatenated on their last axis (SDXL's two CLIP
    encoders' hidden states)."""
    kind: str = "unconditional"
    guidance_scale: float = 1.0
    family: str = ""                   # ptqd.families name of the model
    denoiser: str = DEFAULT_DENOISER   # file and model name stem: unet, transformer
    denoiser_inputs: list[dict] = field(default_factory=list)   # [{name, dtype, dims}] after sample, timestep
    num_classes: int | None = None     # class labels 0 .. num_classes-1
    null_class: int | None = None      # the label of the unconditional half
    text_encoders: list[dict] = field(default_factory=list)
    mask_input: str | None = None      # denoiser input fed the first tokenizer's attention mask (float32)
    constant_inputs: dict = field(default_factory=dict)   # per-image values: SDXL's time_ids, ...
    prompt_preparation: str = ""       # PROMPT_PREPARATION key
    negative_prompt: str = ""          # the unconditional half of a text model, unless a request names one
    zero_uncond: bool = False          # no negative prompt given: the unconditional text inputs are zeros
    default_conditions: list = field(default_factory=list)  # what images are conditioned on by default
    latent: bool = False               # a VAE decoder turns x_0 into the image
    image_shape: list[int] = field(default_factory=list)   # [C, H, W] of the final image

    @property
    def conditional(self) -> bool:
        return self.kind != "unconditional"

    @property
    def guided(self) -> bool:
        return self.conditional and self.guidance_scale != 1.0

    def save(self, folder: Path) -> Path:
        path = Path(folder) / SPEC_FILE
        path.write_text(json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> "PipelineSpec":
        """The spec in `folder`; an output made before conditional models has none: unconditional."""
        path = Path(folder) / SPEC_FILE
        if not path.is_file():
            return cls()
        doc = json.loads(path.read_text())
        version = doc.pop("format_version", None)
        if version == 1:
            doc = _from_version_1(doc)
        elif version != FORMAT_VERSION:
            raise ValueError(f"{path}: unknown format version {version!r}")
        return cls(**doc)

    def check_conditions(self, items: Sequence) -> list:
        """Prompts (str) or class labels (int) for this model; ValueError names what is wrong."""
        if not self.conditional:
            if items:
                raise ValueError("this model is unconditional: it takes no prompts or class labels")
            return []
        items = list(items) or list(self.default_conditions)
        if self.kind == "class":
            bad = [c for c in items if isinstance(c, bool) or not isinstance(c, (int, np.integer))
                   or not 0 <= int(c) < self.num_classes]
            if bad:
                raise ValueError(f"class labels must be integers in 0..{self.num_classes - 1}, got {bad[0]!r}")
            return [int(c) for c in items]
        bad = [p for p in items if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be text, got {bad[0]!r}")
        return items


def _from_version_1(doc: dict) -> dict:
    """pipeline.json as ptqd wrote it before model families: one CLIP text encoder whose last
    hidden state is the UNet's encoder_hidden_states (unet_inputs, max_length)."""
    doc["denoiser_inputs"] = doc.pop("unet_inputs", [])
    max_length = doc.pop("max_length", None)
    if doc.get("kind") == "text":
        # its TensorRT graph was the FP32 one (no FP16 copy was written then)
        doc["text_encoders"] = [{"name": "text_encoder", "tokenizer": "tokenizer", "max_length": max_length,
                                 "mask": False, "fp16": False, "outputs": [{"name": TEXT_OUTPUT,
                                                             "dims": doc["denoiser_inputs"][0]["dims"]}]}]
    return doc


class Guided:
    """A (sample, timestep) engine: classifier-free guidance around `engine`, which takes the
    conditioning inputs as keyword arrays. With scale 1 only the conditional half runs."""

    def __init__(self, engine, cond: Mapping[str, np.ndarray], uncond: Mapping[str, np.ndarray],
                 scale: float):
        self.engine, self.cond, self.uncond, self.scale = engine, dict(cond), dict(uncond), scale

    def __call__(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        if self.scale == 1.0:
            return self.engine(sample, timestep, **self.cond)
        n = len(sample)
        both = {k: np.concatenate([self.uncond[k], self.cond[k]]) for k in self.cond}
        out = np.asarray(self.engine(np.concatenate([sample, sample]), np.concatenate([timestep, timestep]),
                                     **both), dtype=np.float32)
        uncond, cond = out[:n], out[n:]
        return (uncond + np.float32(self.scale) * (cond - uncond)).astype(np.float32, copy=False)


# prompts -> (input_ids [N, L] int64, attention_mask [N, L] int64)
Tokenize = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
# (input_ids, attention_mask) -> {denoiser input name: [N, ...] float32}
Encode = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


@dataclass
class Conditioner:
    """Turns the conditions of a request into per-chunk guided engines.

    Image i (its index among the seed's samples, as the noise counts them) is conditioned on
    conditions[i % len(conditions)], whatever the batch or the request it is drawn in.
    text: per text encoder of the spec (by name), its tokenizer and encoder; negative_prompt:
    the unconditional prompt of this request (None: the spec's default)."""
    spec: PipelineSpec
    conditions: list
    text: dict[str, tuple[Tokenize, Encode]] = field(default_factory=dict)
    negative_prompt: str | None = None
    # encoded once per chunk: every step (and every configuration) of a chunk reuses them
    _cache: dict = field(default_factory=dict, repr=False)

    def _constants(self, count: int) -> dict[str, np.ndarray]:
        return {name: np.broadcast_to(np.asarray(values, dtype=np.float32), (count, len(values))).copy()
                for name, values in self.spec.constant_inputs.items()}

    def inputs(self, items: list) -> dict[str, np.ndarray]:
        if self.spec.kind == "class":
            return {CLASS_INPUT: np.asarray(items, dtype=np.int64)}
        prompts = [PROMPT_PREPARATION[self.spec.prompt_preparation](p) for p in items]
        parts: dict[str, list[np.ndarray]] = {}
        mask = None
        for encoder in self.spec.text_encoders:
            tokenize, encode = self.text[encoder["name"]]
            ids, encoder_mask = tokenize(prompts)
            mask = encoder_mask if mask is None else mask
            for name, value in encode(ids, encoder_mask).items():
                parts.setdefault(name, []).append(np.asarray(value, dtype=np.float32))
        out = {name: v[0] if len(v) == 1 else np.concatenate(v, axis=-1) for name, v in parts.items()}
        if self.spec.mask_input:
            out[self.spec.mask_input] = np.asarray(mask, dtype=np.float32)
        return {**out, **self._constants(len(items))}

    def unconditional(self, cond: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
        """The unconditional half: the null class; the negative prompt; or, for a model whose
        pipeline zeroes it (SDXL's force_zeros_for_empty_prompt) and no negative prompt was
        given, zeros in place of every text encoder output."""
        if self.spec.kind == "class":
            return self.inputs([self.spec.null_class] * count)
        if self.negative_prompt is None and self.spec.zero_uncond:
            encoded = {o["name"] for e in self.spec.text_encoders for o in e["outputs"]}
            return {k: np.zeros_like(v) if k in encoded else v for k, v in cond.items()}
        negative = self.spec.negative_prompt if self.negative_prompt is None else self.negative_prompt
        return self.inputs([negative] * count)

    def chunk_inputs(self, start: int, count: int) -> tuple[dict, dict]:
        """(cond, uncond) inputs for images start .. start+count-1."""
        if (start, count) in self._cache:
            return self._cache[start, count]
        items = [self.conditions[(start + j) % len(self.conditions)] for j in range(count)]
        cond = self.inputs(items)
        self._cache[start, count] = cond, self.unconditional(cond, count)
        return self._cache[start, count]

    def guided(self, engine, start: int, count: int) -> Guided:
        """`engine` as a (sample, timestep) engine for images start .. start+count-1."""
        return Guided(engine, *self.chunk_inputs(start, count), self.spec.guidance_scale)

    def engines_for(self, engines: Mapping, start: int, count: int) -> dict:
        return {cfg: self.guided(e, start, count) for cfg, e in engines.items()}


class GraphTextEncoder:
    """A text encoder graph (onnxruntime session, TensorRT plan, Triton model: anything with
    `outputs(**inputs) -> {name: array}`) as a Conditioner's Encode."""

    def __init__(self, graph, encoder: dict):
        self.graph, self.mask = graph, bool(encoder.get("mask"))
        self.names = [o["name"] for o in encoder["outputs"]]

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {TOKENS_INPUT: ids, **({MASK_INPUT: mask} if self.mask else {})}
        outputs = self.graph.outputs(**feeds)
        return {name: outputs[name] for name in self.names}


def guided_batch(batch: int, spec: PipelineSpec) -> int:
    """Images per chunk when each UNet call takes at most `batch` samples (guidance doubles it)."""
    return max(1, batch // 2) if spec.guided else batch


def decode_images(x0: np.ndarray, decoder: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """Model-scale x_0 (or latents, through the VAE decoder) -> images in [0, 1]."""
    x = x0 if decoder is None else np.asarray(decoder(x0), dtype=np.float32)
    return np.clip(x / 2.0 + 0.5, 0.0, 1.0).astype(np.float32)


def runtime_conditioner(spec: PipelineSpec, conditions: Sequence, tokenizer_root: Path | None,
                        text_graphs: Mapping | None = None, negative_prompt: str | None = None
                        ) -> Conditioner | None:
    """The deployed conditioner: the saved tokenizers (one folder per text encoder under
    `tokenizer_root`: OUT/scheduler, or the Triton sampler's version folder) and a graph per
    text encoder (onnxruntime sessions, TensorRT plans, Triton models), by name; None for
    unconditional models."""
    items = spec.check_conditions(conditions)   # unconditional: refuses any condition
    if not spec.conditional:
        return None
    if spec.kind == "class":
        return Conditioner(spec, items)
    text = {e["name"]: (_prompt_tokenizer(str(Path(tokenizer_root) / e["tokenizer"])).encode,
                        GraphTextEncoder(text_graphs[e["name"]], e)) for e in spec.text_encoders}
    return Conditioner(spec, items, text, negative_prompt)


@functools.lru_cache(maxsize=8)
def _prompt_tokenizer(folder: str):
    """Loaded once per process: the Triton sampler builds a conditioner per request."""
    from ptqd.runtime.tokenizer import PromptTokenizer

    return PromptTokenizer.from_folder(Path(folder))
