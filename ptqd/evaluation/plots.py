"""The report's figures, as PNG bytes (matplotlib, headless Agg backend)."""
from __future__ import annotations

import io

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from ptqd.errors import UserError

        raise UserError("the report's plots need matplotlib, a ptqd dependency: reinstall ptqd "
                        "(or skip the report with --no-report)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def noise_statistics(steps: list[dict], per_config: dict[str, list[dict]]) -> bytes:
    """k_t, mean |bias| and sigma_q per step for each configuration; the schedule's choice marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for (key, label), ax in zip((("k", "correlation k_t"), ("bias_abs", "mean |bias|"),
                                 ("sigma_q", "residual σ_q")), axes):
        for cfg, rows in per_config.items():
            ax.plot([r["index"] for r in rows], [r[key] for r in rows], label=cfg, lw=1.2)
        chosen = [(s["index"], s[key]) for s in steps]
        ax.scatter(*zip(*chosen), s=9, c="k", zorder=3, label="schedule")
        ax.set_title(label)
        ax.set_xlabel("step (0 = noisiest)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _png(fig)


def snr(per_config: dict[str, list[dict]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for i, (cfg, rows) in enumerate(per_config.items()):
        color = f"C{i}"
        idx = [r["index"] for r in rows]
        ax.plot(idx, [r["snr_before_db"] for r in rows], color=color, ls="--", label=f"{cfg} naive")
        ax.plot(idx, [r["snr_after_db"] for r in rows], color=color, label=f"{cfg} PTQD")
    ax.set_xlabel("step (0 = noisiest)")
    ax.set_ylabel("SNR of the UNet output, dB")
    ax.set_title("quantization noise: SNR before / after the PTQD correction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def schedule(steps: list[dict], configs: list[str]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 1.9))
    level = {c: i for i, c in enumerate(configs)}
    idx = [s["index"] for s in steps]
    ax.step(idx, [level[s["config"]] for s in steps], where="mid", color="C3")
    ax.set_yticks(range(len(configs)), configs)
    ax.set_ylim(-0.5, len(configs) - 0.5)
    ax.set_xlabel("step (0 = noisiest)")
    ax.set_title("precision schedule")
    ax.grid(alpha=0.3)
    return _png(fig)


def step_error(errors: dict[str, list[float]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for name, values in errors.items():
        ax.plot(range(len(values)), values, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step (0 = noisiest)")
    ax.set_ylabel("MSE of x_t to FP32's x_t")
    ax.set_title("how far the quantized trajectory drifts, step by step")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig)


def sample_grids(grids: dict[str, np.ndarray]) -> bytes:
    """Side-by-side grids (uint8 HxW or HxWxC from ptqd.images.grid_array), same seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(3.4 * len(grids), 3.6))
    for ax, (title, grid) in zip(np.atleast_1d(axes), grids.items()):
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    return _png(fig)
