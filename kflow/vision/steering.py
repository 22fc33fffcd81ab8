"""Steerable image generation (paper §5.3–5.4) and its figure-style grids.

- Noise splitting: samples in a group share the source noise of chosen bands and draw the rest independently
  (``grouped_noise``; built on ``kflow.core.share_bands``). Sharing the high bands keeps details and varies the
  layout (Fig. 9); sharing the low bands does the reverse, which works best with a flow trained in reversed order,
  high → low (``train_image_model(order="high_to_low")``, Fig. 11).
- Condition dropping: the class condition is kept for t < τ and replaced by the null class afterwards
  (``sample_kept_and_dropped``; the paper keeps it for the first 30%).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kflow.core import share_bands
from kflow.utils.io import atomic_path
from kflow.vision.pipeline import sample_latents

__all__ = ["grouped_noise", "sample_kept_and_dropped", "save_image_grid", "steering_figures"]


def grouped_noise(shape: Sequence[int], decomposition, shared_bands: int | Sequence[int], group_size: int = 2,
                  seed: int = 0) -> torch.Tensor:
    """Source noise [N, *shape[1:]] (N = shape[0], a multiple of group_size) in consecutive groups of
    ``group_size`` samples that share the coefficients of ``shared_bands`` and differ in every other band."""
    n = shape[0]
    if n % group_size:
        raise ValueError(f"batch of {n} is not a multiple of group_size {group_size}")
    noise = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
    groups = torch.arange(n // group_size).repeat_interleave(group_size)
    return share_bands(noise, decomposition, shared_bands, groups=groups)


@torch.no_grad()
def sample_kept_and_dropped(dit, flow, labels: torch.Tensor, tau: float = 0.3, noise: torch.Tensor | None = None,
                            steps: int = 20, method: str = "heun", cfg_scale: float = 1.0, seed: int = 0):
    """From the same source noise, latents with the class condition kept for the whole path and kept only for
    t < τ (null class after). Returns (kept [N, C, H, W], dropped [N, C, H, W])."""
    if not dit.num_classes:
        raise ValueError("condition dropping needs a class-conditional DiT (num_classes > 0)")
    shape = (len(labels), dit.in_channels, dit.input_size, dit.input_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) if noise is None else noise
    kept = sample_latents(dit, flow, len(labels), labels, steps, method, cfg_scale, noise=noise)
    dropped = sample_latents(dit, flow, len(labels), labels, steps, method, cfg_scale, condition_tau=tau, noise=noise)
    return kept, dropped


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Images [N, C, H, W] in [0, 1] (C = 1 or 3) -> PNG grid with 1-pixel white borders, written atomically."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + 2), nrow * (w + 2))
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = images[i]
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(arr[..., 0] if c == 1 else arr).save(tmp, format="PNG")
    return Path(path)


@torch.no_grad()
def steering_figures(dit, flow, autoencoder, out_dir: str | os.PathLike, pairs: int = 6, steps: int = 20,
                     tau: float = 0.3, seed: int = 0, method: str = "heun") -> dict[str, Path]:
    """Write the paper-style grids under out_dir and return {name: path}:

    share_high_bands.png: pairs (side by side) with the same high-band noise, different low bands (Fig. 9);
    share_low_bands.png: pairs with the same low-band noise (band 0), different high bands (Fig. 11);
    condition_kept_vs_dropped.png (conditional DiT only): each pair is the same noise and class with the condition
    kept for the whole path (left) and dropped after τ (right) (Fig. 7).
    """
    out = Path(out_dir)
    shape = (2 * pairs, dit.in_channels, dit.input_size, dit.input_size)
    labels = (torch.arange(pairs) % dit.num_classes).repeat_interleave(2) if dit.num_classes else None
    k = flow.decomposition.num_bands
    nrow = 2 * min(pairs, 4)
    figures = {}
    for name, bands in (("share_low_bands", [0]), ("share_high_bands", list(range(1, k)))):
        if not bands:  # one band: nothing to split
            continue
        noise = grouped_noise(shape, flow.decomposition, bands, group_size=2, seed=seed)
        z = sample_latents(dit, flow, 2 * pairs, labels, steps, method, noise=noise)
        figures[name] = save_image_grid(autoencoder.decode(z), out / f"{name}.png", nrow=nrow)
    if dit.num_classes:
        kept, dropped = sample_kept_and_dropped(dit, flow, torch.arange(pairs) % dit.num_classes, tau, steps=steps,
                                                method=method, seed=seed)
        both = torch.stack([autoencoder.decode(kept), autoencoder.decode(dropped)], 1).flatten(0, 1)
        figures["condition_kept_vs_dropped"] = save_image_grid(both, out / "condition_kept_vs_dropped.png", nrow=nrow)
    return figures
