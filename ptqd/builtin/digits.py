"""The digits data the built-in model is trained on and judged against.

scikit-learn ships the 1,797 8x8 images of its digits set inside the wheel, so this works
offline. The diffusion model works at 16x16: the 8x8 images are upsampled bilinearly.
"""
from __future__ import annotations

import numpy as np

IMAGE_SIZE = 16


def load_digits_images(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Return (images float32 [N, 1, size, size] in [0, 1], labels int64 [N])."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0).numpy(), digits.target.astype(np.int64)
