"""Train the built-in models on scikit-learn's digits: a DDPM UNet (`digits`) with the digit
classifier that judges both, and a class-conditional diffusion transformer (`digits-dit`).

    python -m ptqd.builtin.train --output ptqd/builtin/digits-ddpm
    python -m ptqd.builtin.train --model digits-dit --steps 12000 --output ptqd/builtin/digits-dit

Seeded and CPU-only, so a rerun on the same torch build reproduces the shipped weights.
`digits` is a diffusers DDIMPipeline folder (model_index.json, unet/, scheduler/) plus
classifier/ with the judge network the evaluation uses; `digits-dit` is transformer/ and
scheduler/ with the class bookkeeping in model_index.json, judged by that same classifier.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ptqd.builtin.classifier import DigitClassifier
from ptqd.builtin.digits import IMAGE_SIZE, load_digits_images


def build_unet():
    from diffusers import UNet2DModel

    # One attention level so the built-in model exercises the Linear/MatMul paths that
    # real diffusion UNets have, while staying small enough to calibrate on 2 CPU cores.
    return UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=32,
    )


# digits-dit: 10 digit classes, and the extra label DiT's class embedding learns as "no class"
# (trained by dropping labels), which classifier-free guidance feeds the unconditional half
NUM_CLASSES = 10
LABEL_DROP = 0.1
DIT_PIPELINE = "PTQDClassConditionalPipeline"
# the guidance scale digits-dit is calibrated and deployed with unless told otherwise: measured on
# 200 full-precision samples (50 DDIM steps), class accuracy by the shipped classifier and
# Fréchet distance to the real digits: 0.980 / 28.4 at 1 (no guidance), 1.000 / 40.3 at 1.5,
# 1.000 / 83.4 at 2, 1.000 / 211.1 at DiTPipeline's 4 (stronger guidance, less variety)
DIT_GUIDANCE = 1.5


def build_dit():
    from diffusers import DiTTransformer2DModel

    # DiT's block (adaLN-Zero, patchified, class label through the adaLN embedding) at a size
    # that trains on 2 CPU cores: 64 tokens of width 128 (patch 2 on 16x16), 6 blocks, 2.1 M
    # parameters. No learned variance: DDIM never reads it.
    return DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=6,
        sample_size=IMAGE_SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=8,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    # clip_sample=False keeps every DDIM step affine in the noise prediction, which is what
    # lets the exporter fold PTQD's corrections into per-step constants (PTQD.md §4).
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02, clip_sample=False,
                         prediction_type="epsilon")


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_denoiser(build, images: torch.Tensor, labels: torch.Tensor | None, steps: int, batch: int,
                   seed: int, peak_lr: float, warmup: int):
    """eps-prediction training with AdamW, a warmup + cosine learning rate and an EMA copy.
    With `labels`, the model is class-conditional (DiT's call) and a whole sample's label is
    dropped to the null class with probability LABEL_DROP, so guidance has an unconditional
    model to push against."""
    from diffusers import DDPMScheduler
    from diffusers.models.embeddings import LabelEmbedding

    torch.manual_seed(seed)
    model = build()
    ema = copy.deepcopy(model).requires_grad_(False)
    model.train()
    for module in model.modules():
        # diffusers drops labels inside every DiT block independently; here a sample is either
        # conditional in all blocks or in none, as it is when sampled with guidance
        if isinstance(module, LabelEmbedding):
            module.eval()
    noise_sched = DDPMScheduler.from_config(build_scheduler().config)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    data = images * 2.0 - 1.0
    start, running = time.time(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup)
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        if labels is None:
            pred = model(xt, t).sample
        else:
            drop = torch.rand(batch, generator=gen) < LABEL_DROP
            pred = model(xt, t, torch.where(drop, NUM_CLASSES, labels[idx])).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1.0 - 0.999)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            print(f"{type(model).__name__} step {step:5d}/{steps}  loss {running:.4f}  "
                  f"{time.time() - start:7.1f}s", flush=True)
    return ema.eval(), time.time() - start


def train_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int = 30):
    torch.manual_seed(seed)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test_idx, train_idx = perm[:360], perm[360:]
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for chunk in order.split(64):
            x = images[chunk]
            # One-pixel shifts make the judge robust to the small misplacements samples have.
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[chunk])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    return model, acc


def save(output: Path, unet, classifier, info: dict) -> None:
    from safetensors.torch import save_file

    output.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(output / "unet")
    build_scheduler().save_pretrained(output / "scheduler")
    (output / "model_index.json").write_text(json.dumps({
        "_class_name": "DDIMPipeline", "_diffusers_version": info["diffusers"],
        "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"],
    }, indent=2) + "\n")
    (output / "classifier").mkdir(exist_ok=True)
    save_file(classifier.state_dict(), str(output / "classifier" / "classifier.safetensors"))
    (output / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def save_dit(output: Path, transformer, info: dict) -> None:
    output.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(output / "transformer")
    build_scheduler().save_pretrained(output / "scheduler")
    # no diffusers pipeline class fits a pixel-space DiT (DiTPipeline decodes with a VAE): the
    # components are listed by hand, with the classes and the null class, as for class UNets
    (output / "model_index.json").write_text(json.dumps({
        "_class_name": DIT_PIPELINE, "_diffusers_version": info["diffusers"],
        "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "DiTTransformer2DModel"],
        "num_classes": NUM_CLASSES, "null_class": NUM_CLASSES, "guidance_scale": DIT_GUIDANCE,
    }, indent=2) + "\n")
    (output / "training.json").write_text(json.dumps(info, indent=2) + "\n")


# per built-in model: what is built, its training steps, peak learning rate and warmup (the
# UNet's as its shipped weights were trained; a transformer wants a lower peak, a longer warmup)
MODELS = {"digits": (build_unet, 5000, 1e-3, 200), "digits-dit": (build_dit, 12000, 5e-4, 500)}


def main(argv=None) -> None:
    import diffusers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="digits")
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None, help="training steps [default: per model]")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    build, default_steps, peak_lr, warmup = MODELS[args.model]
    steps = args.steps or default_steps
    images_np, labels_np = load_digits_images()
    images, labels = torch.from_numpy(images_np), torch.from_numpy(labels_np)
    conditional = args.model == "digits-dit"
    model, seconds = train_denoiser(build, images, labels if conditional else None, steps, args.batch, args.seed,
                                    peak_lr, warmup)
    info = {"seed": args.seed, "steps": steps, "batch": args.batch, "peak_lr": peak_lr,
            "train_seconds": round(seconds, 1), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "threads": args.threads, "numpy": np.__version__}
    if conditional:
        save_dit(args.output, model, {**info, "label_drop": LABEL_DROP})
        return
    classifier, acc = train_classifier(images, labels, args.seed)
    print(f"classifier held-out accuracy {acc:.3f}")
    save(args.output, model, classifier, {**info, "classifier_holdout_accuracy": round(acc, 4)})


if __name__ == "__main__":
    main()
