"""The paper's analyses: relative norm per band of real latents (Fig. 3) and the PCA-projection ratio along sampled
trajectories (Fig. 4), as numbers and as PNG plots (``kflow.vision.workflow.analyze_runs`` runs them on trained
runs)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from kflow.core import Decomposition, PCADecomposition
from kflow.utils.io import atomic_path

__all__ = ["band_energy_profile", "plot_band_energy", "pca_projection_ratio", "plot_projection_ratio"]


@torch.no_grad()
def band_energy_profile(latents: torch.Tensor, decomposition: Decomposition, batch_size: int = 512) -> dict:
    """Per band: share of the total energy and RMS amplitude per coefficient, averaged over ``latents`` [N, ...]."""
    energy = sum(decomposition.band_energies(latents[i:i + batch_size].double()).reshape(
        -1, decomposition.num_bands).sum(0) for i in range(0, len(latents), batch_size))
    lead = latents[0].dim() - len(decomposition.data_shape)  # channels broadcast over the band index
    per_band = decomposition.band_sizes().double() * (latents.shape[1] if lead else 1)
    return {"energy_share": (energy / energy.sum()).tolist(),
            "rms_amplitude": (energy / (per_band * len(latents))).sqrt().tolist()}


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_band_energy(profiles: dict[str, dict], path: str | os.PathLike) -> Path:
    """Bar plot of the energy share per band for several decompositions ({name: band_energy_profile(...)})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    width = 0.8 / max(len(profiles), 1)
    for i, (name, prof) in enumerate(profiles.items()):
        share = prof["energy_share"]
        ax.bar([b + i * width for b in range(len(share))], share, width, label=name)
    ax.set_xlabel("band (low → high scale)")
    ax.set_ylabel("share of energy")
    ax.legend()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def pca_projection_ratio(trajectory: torch.Tensor, pca: PCADecomposition, top: int) -> torch.Tensor:
    """Energy share of the ``top`` leading principal components along a trajectory [T, B, ...] -> [T]."""
    coeffs = pca(trajectory.double()).reshape(trajectory.shape[0], trajectory.shape[1], -1)  # [T, B, D]
    order = torch.argsort(pca.explained_variance, descending=True)[:top]
    energy = coeffs.pow(2)
    return (energy[..., order].sum(-1) / energy.sum(-1).clamp_min(1e-12)).mean(1)


def plot_projection_ratio(curves: dict[str, torch.Tensor], times: torch.Tensor, path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for name, curve in curves.items():
        ax.plot(times.tolist(), curve.tolist(), label=name)
    ax.set_xlabel("t")
    ax.set_ylabel("energy share of top PCs")
    ax.legend()
    _save(fig, path)
    plt.close(fig)
    return Path(path)
