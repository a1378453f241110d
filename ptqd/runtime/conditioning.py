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

from ptqd.runtime.layout import CLASS_INPUT, SPEC_FILE, TEXT_OUTPUT

# the UNet's conditioning inputs: class labels, or the text encoder's output
TEXT_INPUT = TEXT_OUTPUT


@dataclass
class PipelineSpec:
    """How a model is conditioned and decoded; saved as OUT/scheduler/pipeline.json."""
    kind: str = "unconditional"
    guidance_scale: float = 1.0
    unet_inputs: list[dict] = field(default_factory=list)   # [{name, dtype, dims}] after sample, timestep
    num_classes: int | None = None     # class labels 0 .. num_classes-1
    null_class: int | None = None      # the label of the unconditional half
    max_length: int | None = None      # tokens per prompt
    negative_prompt: str = ""          # the unconditional half of a text model
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
        path.write_text(json.dumps({"format_version": 1, **asdict(self)}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> "PipelineSpec":
        """The spec in `folder`; an output made before conditional models has none: unconditional."""
        path = Path(folder) / SPEC_FILE
        if not path.is_file():
            return cls()
        doc = json.loads(path.read_text())
        doc.pop("format_version", None)
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


TextEncoder = Callable[[np.ndarray], np.ndarray]   # input_ids [N, L] int64 -> [N, L, D] float32


@dataclass
class Conditioner:
    """Turns the conditions of a request into per-chunk guided engines.

    Image i (its index among the seed's samples, as the noise counts them) is conditioned on
    conditions[i % len(conditions)], whatever the batch or the request it is drawn in."""
    spec: PipelineSpec
    conditions: list
    tokenizer: Callable[[list[str]], np.ndarray] | None = None
    text_encoder: TextEncoder | None = None
    # encoded once per chunk: every step (and every configuration) of a chunk reuses them
    _cache: dict = field(default_factory=dict, repr=False)

    def inputs(self, items: list) -> dict[str, np.ndarray]:
        if self.spec.kind == "class":
            return {CLASS_INPUT: np.asarray(items, dtype=np.int64)}
        ids = self.tokenizer(list(items))
        return {TEXT_INPUT: np.asarray(self.text_encoder(ids), dtype=np.float32)}

    def chunk_inputs(self, start: int, count: int) -> tuple[dict, dict]:
        """(cond, uncond) inputs for images start .. start+count-1."""
        if (start, count) in self._cache:
            return self._cache[start, count]
        items = [self.conditions[(start + j) % len(self.conditions)] for j in range(count)]
        null = self.spec.null_class if self.spec.kind == "class" else self.spec.negative_prompt
        self._cache[start, count] = self.inputs(items), self.inputs([null] * count)
        return self._cache[start, count]

    def guided(self, engine, start: int, count: int) -> Guided:
        """`engine` as a (sample, timestep) engine for images start .. start+count-1."""
        return Guided(engine, *self.chunk_inputs(start, count), self.spec.guidance_scale)

    def engines_for(self, engines: Mapping, start: int, count: int) -> dict:
        return {cfg: self.guided(e, start, count) for cfg, e in engines.items()}


def guided_batch(batch: int, spec: PipelineSpec) -> int:
    """Images per chunk when each UNet call takes at most `batch` samples (guidance doubles it)."""
    return max(1, batch // 2) if spec.guided else batch


def decode_images(x0: np.ndarray, decoder: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """Model-scale x_0 (or latents, through the VAE decoder) -> images in [0, 1]."""
    x = x0 if decoder is None else np.asarray(decoder(x0), dtype=np.float32)
    return np.clip(x / 2.0 + 0.5, 0.0, 1.0).astype(np.float32)


def runtime_conditioner(spec: PipelineSpec, conditions: Sequence, tokenizer_dir: Path | None,
                        text_encoder: TextEncoder | None) -> Conditioner | None:
    """The deployed conditioner: the saved tokenizer and a text-encoder engine (an
    onnxruntime session, a TensorRT plan, a Triton model); None for unconditional models."""
    items = spec.check_conditions(conditions)   # unconditional: refuses any condition
    if not spec.conditional:
        return None
    if spec.kind == "class":
        return Conditioner(spec, items)
    return Conditioner(spec, items, _prompt_tokenizer(str(tokenizer_dir)), text_encoder)


@functools.lru_cache(maxsize=4)
def _prompt_tokenizer(folder: str):
    """Loaded once per process: the Triton sampler builds a conditioner per request."""
    from ptqd.runtime.tokenizer import PromptTokenizer

    return PromptTokenizer.from_folder(Path(folder))
