"""A small CNN that classifies 16x16 digits.

It ships beside the built-in diffusion model and serves two purposes: a judge of whether
samples are digits (and of which class), and a feature space for a Fréchet distance between
sample sets, in the role Inception plays for FID on natural images.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], [N, 1, 16, 16] -> penultimate features [N, FEATURE_DIM]."""
        return self.body(images * 2.0 - 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_classifier(folder: Path) -> DigitClassifier:
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    return model.eval()
