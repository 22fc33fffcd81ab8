"""Steerable image generation (paper §5.3–5.4) and its figure-style grids.

- Noise splitting: samples in a group share the source noise of chosen bands and draw the rest independently
  (``grouped_noise``; built on ``kflow.core.share_bands``). Sharing the high bands keeps details and varies the
  layout (Fig. 9); sharing the low bands does the reverse, which works best with a flow trained in reversed order,
  high → low (``ImageModelConfig(order="high_to_low")``, Fig. 11).
- Condition dropping: the class condition is kept for t < τ and replaced by the null class afterwards
  (``sample_kept_and_dropped``; the paper keeps it for the first 30%).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from kflow.core import share_bands
from kflow.vision.artifacts import save_image_grid
from kflow.vision.sampling import SamplingConfig, decode_latents, generate_images, sample_latents

__all__ = ["grouped_noise", "sample_kept_and_dropped", "steering_figures"]

PAIRS_PER_ROW = 4  # figure grids show at most this many side-by-side pairs per row


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


@torch.no_grad()
def steering_figures(dit, flow, autoencoder, out_dir: str | os.PathLike, pairs: int = 6, steps: int = 20,
                     tau: float = 0.3, seed: int = 0, method: str = "heun", prefix: str = "") -> dict[str, Path]:
    """Write the paper-style grids under out_dir (file names start with ``prefix``) and return {name: path}:

    share_high_bands.png: pairs (side by side) with the same high-band noise, different low bands (Fig. 9);
    share_low_bands.png: pairs with the same low-band noise (band 0), different high bands (Fig. 11);
    condition_kept_vs_dropped.png (conditional DiT only): each pair is the same noise and class with the condition
    kept for the whole path (left) and dropped after τ (right) (Fig. 7).
    """
    out = Path(out_dir)
    shape = (2 * pairs, dit.in_channels, dit.input_size, dit.input_size)
    labels = (torch.arange(pairs) % dit.num_classes).repeat_interleave(2) if dit.num_classes else None
    k = flow.decomposition.num_bands
    nrow = 2 * min(pairs, PAIRS_PER_ROW)
    sampling = SamplingConfig(steps=steps, method=method, batch_size=2 * pairs)
    figures = {}
    for name, bands in (("share_low_bands", [0]), ("share_high_bands", list(range(1, k)))):
        if not bands:  # one band: nothing to split
            continue
        noise = grouped_noise(shape, flow.decomposition, bands, group_size=2, seed=seed)
        images = generate_images(dit, flow, autoencoder, labels, 2 * pairs, sampling, noise=noise)
        figures[name] = save_image_grid(images, out / f"{prefix}{name}.png", nrow=nrow)
    if dit.num_classes:
        kept, dropped = sample_kept_and_dropped(dit, flow, torch.arange(pairs) % dit.num_classes, tau, steps=steps,
                                                method=method, seed=seed)
        both = torch.stack([decode_latents(autoencoder, kept), decode_latents(autoencoder, dropped)], 1).flatten(0, 1)
        figures["condition_kept_vs_dropped"] = save_image_grid(both, out / f"{prefix}condition_kept_vs_dropped.png",
                                                               nrow=nrow)
    return figures
