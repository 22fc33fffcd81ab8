"""Figure-style grids of steerable generation (paper §5.3–5.4)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from kflow.core import share_bands
from kflow.utils.io import atomic_path
from kflow.vision.pipeline import sample_latents

__all__ = ["save_image_grid", "steering_figures"]


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Images [N, C, H, W] in [0, 1] -> PNG grid, written atomically."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + 2), nrow * (w + 2))
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = images[i]
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(arr[..., 0] if c == 1 else arr).save(tmp, format="PNG")
    return Path(path)


@torch.no_grad()
def steering_figures(dit, flow, autoencoder, out_dir: str | os.PathLike, pairs: int = 6, steps: int = 20,
                     tau: float = 0.3, seed: int = 0) -> dict[str, Path]:
    """Write three grids: pairs sharing the low-band noise (same coarse layout, different details), pairs sharing
    the high-band noise, and the same noise with the class kept for the whole path vs dropped after τ."""
    out = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    shape = (2 * pairs, dit.in_channels, dit.input_size, dit.input_size)
    noise = torch.randn(shape, generator=gen)
    groups = torch.arange(pairs).repeat_interleave(2)
    labels = (torch.arange(pairs) % max(dit.num_classes, 1)).repeat_interleave(2) if dit.num_classes else None
    k = flow.decomposition.num_bands
    figures = {}
    for name, bands in (("share_low_bands", [0]), ("share_high_bands", list(range(1, k)))):
        if not bands:
            continue
        z = sample_latents(dit, flow, 2 * pairs, labels, steps, noise=share_bands(noise, flow.decomposition, bands,
                                                                                  groups=groups))
        figures[name] = save_image_grid(autoencoder.decode(z), out / f"{name}.png", nrow=2 * min(pairs, 4))
    if dit.num_classes:
        lab = torch.arange(pairs) % dit.num_classes
        kept = sample_latents(dit, flow, pairs, lab, steps, noise=noise[:pairs])
        dropped = sample_latents(dit, flow, pairs, lab, steps, noise=noise[:pairs], condition_tau=tau)
        both = torch.stack([autoencoder.decode(kept), autoencoder.decode(dropped)], 1).flatten(0, 1)
        figures["condition_kept_vs_dropped"] = save_image_grid(both, out / "condition_kept_vs_dropped.png",
                                                               nrow=2 * min(pairs, 4))
    return figures
