"""Quality metrics for sample sets.

- Fréchet distance between Gaussian fits of classifier features (FID's formula; for the
  built-in model the features come from the digits classifier shipped beside it).
- Per-sample error to the full-precision sample of the same seed (MSE, PSNR): the
  repeatable signal of what quantization changed (PTQD.md §2).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    # ReLU features include units that never fire, so the covariances are singular; a 1e-6
    # ridge makes the matrix square root well posed and moves the distance negligibly.
    ridge = np.eye(a.shape[1]) * 1e-6
    cov_a, cov_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    covmean = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def per_sample_error(samples: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Mean over samples of the MSE and PSNR (images in [0, 1]) to the same-seed reference."""
    mse = ((samples.astype(np.float64) - reference) ** 2).reshape(len(samples), -1).mean(1)
    psnr = 10 * np.log10(1.0 / np.maximum(mse, 1e-12))
    return {"mse": float(mse.mean()), "psnr_db": float(psnr.mean())}


class DigitFeatures:
    """Features of the classifier shipped with the built-in model (FID's Inception role)."""

    def __init__(self, classifier_dir: Path):
        from ptqd.builtin.classifier import load_classifier

        self.model = load_classifier(classifier_dir)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model.features(torch.from_numpy(images.astype(np.float32))).numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(images.astype(np.float32))).argmax(1).numpy()


def real_digit_features(features: DigitFeatures) -> np.ndarray:
    from ptqd.builtin.digits import load_digits_images

    images, _ = load_digits_images()
    return features(images)
