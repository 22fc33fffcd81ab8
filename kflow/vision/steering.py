"""Steerable image generation (paper §5.3–5.4) and its figure-style grids.

- Noise splitting: samples in a group share the source noise of chosen bands and draw the rest independently
  (``grouped_noise``; built on ``kflow.core.share_bands``). Sharing the high bands keeps details and varies the
  layout (Fig. 9); sharing the low bands does the reverse, which works best with a flow trained in reversed order,
  high → low (``ImageModelConfig(order="high_to_low")``, Fig. 11).
- Condition dropping: the class condition is kept for t < τ and replaced by the null class afterwards
  (``sample_kept_and_dropped``; the paper keeps it for the first 30%; ``condition_dropping_grid`` over several τ).
- How much steering a model allows, as numbers: ``band_correlation`` / ``noise_splitting_scores`` — the per-band
  correlation between two samples whose source noise shares some bands, next to the same for independent noise.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from kflow.core import share_bands
from kflow.vision.artifacts import save_image_grid
from kflow.vision.sampling import SamplingConfig, decode_latents, generate_images, sample_latents

__all__ = ["grouped_noise", "sample_kept_and_dropped", "steering_figures", "band_correlation",
           "noise_splitting_scores", "condition_dropping_grid"]

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
                     tau: float = 0.3, seed: int = 0, method: str = "heun", prefix: str = "",
                     split=None) -> dict[str, Path]:
    """Write the paper-style grids under out_dir (file names start with ``prefix``) and return {name: path}:

    share_high_bands.png: pairs (side by side) with the same high-band noise, different low bands (Fig. 9);
    share_low_bands.png: pairs with the same low-band noise (band 0), different high bands (Fig. 11);
    condition_kept_vs_dropped.png (conditional DiT only): each pair is the same noise and class with the condition
    kept for the whole path (left) and dropped after τ (right) (Fig. 7).

    ``split``: the decomposition whose bands the noise is split into (default the flow's own; give a K-Flow
    decomposition to probe a one-band flow-matching model the same way).
    """
    out = Path(out_dir)
    split = split if split is not None else flow.decomposition
    shape = (2 * pairs, dit.in_channels, dit.input_size, dit.input_size)
    labels = (torch.arange(pairs) % dit.num_classes).repeat_interleave(2) if dit.num_classes else None
    k = split.num_bands
    nrow = 2 * min(pairs, PAIRS_PER_ROW)
    sampling = SamplingConfig(steps=steps, method=method, batch_size=2 * pairs)
    figures = {}
    for name, bands in (("share_low_bands", [0]), ("share_high_bands", list(range(1, k)))):
        if not bands:  # one band: nothing to split
            continue
        noise = grouped_noise(shape, split, bands, group_size=2, seed=seed)
        images = generate_images(dit, flow, autoencoder, labels, 2 * pairs, sampling, noise=noise)
        figures[name] = save_image_grid(images, out / f"{prefix}{name}.png", nrow=nrow)
    if dit.num_classes:
        kept, dropped = sample_kept_and_dropped(dit, flow, torch.arange(pairs) % dit.num_classes, tau, steps=steps,
                                                method=method, seed=seed)
        both = torch.stack([decode_latents(autoencoder, kept), decode_latents(autoencoder, dropped)], 1).flatten(0, 1)
        figures["condition_kept_vs_dropped"] = save_image_grid(both, out / f"{prefix}condition_kept_vs_dropped.png",
                                                               nrow=nrow)
    return figures


def band_correlation(a: torch.Tensor, b: torch.Tensor, decomposition) -> list[float]:
    """Per band of ``decomposition``: the Pearson correlation between the band's coefficients of a[i] and b[i]
    (latents [N, ...]), averaged over the N pairs. 1: the pair agrees in that band; ~0: unrelated."""
    ca, cb = decomposition(a.double()), decomposition(b.double())
    out = []
    for band in range(decomposition.num_bands):
        mask = decomposition.band_mask(band).to(ca.device).expand_as(ca[0])
        x, y = ca[:, mask], cb[:, mask]  # [N, n_b]
        x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        r = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-12)
        out.append(float(r.mean()))
    return out


@torch.no_grad()
def noise_splitting_scores(dit, flow, decomposition, pairs: int = 32, steps: int = 20, method: str = "heun",
                           seed: int = 0) -> dict[str, list[float]]:
    """How far noise splitting steers ``dit``: ``pairs`` pairs of samples (same class within a pair) whose source
    noise shares band 0 ("share_low"), every other band ("share_high"), or nothing ("independent"); for each, the
    per-band correlation of the two generated latents (``band_correlation`` under ``decomposition``). Steering
    works when the shared bands correlate far above the independent baseline and the others stay near it."""
    shape = (2 * pairs, dit.in_channels, dit.input_size, dit.input_size)
    labels = (torch.arange(pairs) % dit.num_classes).repeat_interleave(2) if dit.num_classes else None
    k = decomposition.num_bands
    result = {}
    for name, bands in (("share_low", [0]), ("share_high", list(range(1, k))), ("independent", None)):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) if bands is None else \
            grouped_noise(shape, decomposition, bands, group_size=2, seed=seed)
        z = sample_latents(dit, flow, 2 * pairs, labels, steps, method, noise=noise)
        result[name] = band_correlation(z[0::2], z[1::2], decomposition)
    return result


@torch.no_grad()
def condition_dropping_grid(dit, flow, autoencoder, path: str | os.PathLike, taus=(0.1, 0.3, 0.5, 0.7, 1.0),
                            classes: int = 8, steps: int = 20, method: str = "heun", seed: int = 0) -> Path:
    """One row per class, one column per τ (the class condition kept for t < τ, null class after; τ = 1 keeps it
    throughout), the same source noise along a row: where the class is decided along the path."""
    if not dit.num_classes:
        raise ValueError("condition dropping needs a class-conditional DiT (num_classes > 0)")
    labels = torch.arange(classes) % dit.num_classes
    shape = (classes, dit.in_channels, dit.input_size, dit.input_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    columns = [decode_latents(autoencoder, sample_latents(dit, flow, classes, labels, steps, method,
                                                          condition_tau=None if tau >= 1 else tau, noise=noise))
               for tau in taus]
    return save_image_grid(torch.stack(columns, 1).flatten(0, 1), path, nrow=len(taus))
