"""Image files a person looks at: sample grids as PNG."""
from __future__ import annotations

import math

import numpy as np


def grid_array(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> one uint8 HxWxC (or HxW) mosaic with a dark border."""
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.zeros((c, rows * (h + pad) + pad, columns * (w + pad) + pad), dtype=np.float32)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y:y + h, x:x + w] = img
    out = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
    return out[0] if c == 1 else out.transpose(1, 2, 0)


def png_bytes(images: np.ndarray, scale: int = 4) -> bytes:
    """A grid of images as PNG bytes, each pixel drawn as scale x scale."""
    import io

    from PIL import Image

    img = Image.fromarray(grid_array(images))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
