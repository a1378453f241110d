"""Model families: what ptqd knows of each kind of diffusers pipeline it quantizes, said once.

    families.detect(spec, class_name, config, index)   the family of a denoiser found in a folder
    families.family_of_module(module)                  the family of a loaded (or fake-quant) denoiser

Detection reads configs only (no torch): the denoiser's class name and config, and the
pipeline's model_index.json. The registry is ordered: the first family whose `matches` holds
takes the model, and its `check` refuses options it does not support, in one line.
"""
from __future__ import annotations

from ptqd.errors import UserError
from ptqd.families.base import ModelFamily, TextEncoderPart
from ptqd.families.transformers import DiT, PixArtAlpha
from ptqd.families.unets import ClassUNet2D, StableDiffusion, StableDiffusionXL, UNet2D

FAMILIES: tuple[ModelFamily, ...] = (UNet2D(), ClassUNet2D(), StableDiffusion(), StableDiffusionXL(), DiT(),
                                     PixArtAlpha())
# where a pipeline folder keeps its denoiser, in the order a folder is searched
DENOISER_FOLDERS = tuple(dict.fromkeys(f.denoiser for f in FAMILIES))

__all__ = ["FAMILIES", "DENOISER_FOLDERS", "ModelFamily", "TextEncoderPart", "detect", "family_of_module",
           "supported_classes"]


def supported_classes() -> list[str]:
    return sorted({c for f in FAMILIES for c in f.denoiser_classes})


def detect(spec: str, class_name: str, config: dict, index: dict | None = None) -> ModelFamily:
    """The family of a denoiser of `class_name` with `config` (a pipeline's model_index.json
    in `index`), its options checked; a UserError naming the model otherwise."""
    family = next((f for f in FAMILIES if f.matches(class_name, config)), None)
    if family is None:
        raise UserError(f"--model {spec!r}: denoiser class {class_name} is not supported "
                        f"(supported: {', '.join(supported_classes())})")
    family.check(spec, config, index or {})
    return family


def family_of_module(module) -> ModelFamily:
    """The family of a diffusers denoiser module (a fake-quant copy keeps its class and config)."""
    return detect(type(module).__name__, type(module).__name__, dict(module.config))
