"""The paper's analyses: relative norm per band of real latents (Fig. 3) and the PCA-projection ratio along sampled
trajectories (Fig. 4), as numbers and as PNG plots."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from kflow.core import Decomposition, PCADecomposition
from kflow.utils.io import atomic_path

__all__ = ["band_energy_profile", "plot_band_energy", "pca_projection_ratio", "plot_projection_ratio",
           "analyze_runs"]


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


def analyze_runs(run_dirs, out_dir: str | os.PathLike, num_bands: int = 3, num_latents: int = 2048,
                 num_trajectories: int = 64, steps: int = 20, top_fraction: float = 0.1, seed: int = 0) -> dict:
    """Both analyses for trained image runs (folders written by ``train_image_model``), as PNGs and a JSON.

    Fig. 3: energy share per band of the first run's cached training latents under Fourier, Wavelet and PCA
    decompositions with ``num_bands`` bands. Fig. 4: for every run, the share of a sample's energy in the leading
    ``top_fraction`` of principal components (PCA fitted on those latents) along the sampled trajectory
    (``num_trajectories`` samples, ``steps`` Euler steps): K-Flow fixes the coarse structure early, so its curve
    should rise earlier than flow matching's. Returns the numbers written to ``out_dir/analysis.json``.
    """
    import json

    from kflow.core import FourierDecomposition
    from kflow.utils.io import atomic_write_text
    from kflow.vision.latent_cache import read_latent_cache
    from kflow.vision.pipeline import build_decomposition, sample_latents
    from kflow.vision.workflow import load_image_model

    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("analyze_runs needs at least one run folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, _, _, config = load_image_model(run_dirs[0])
    latents = read_latent_cache(Path(config.get("latent_dir", run_dirs[0])) / "latents.lmdb")[0][:num_latents]
    shape = tuple(latents.shape[1:])
    decompositions = {"Fourier": FourierDecomposition(shape[1:], num_bands),
                      "Wavelet": build_decomposition("wavelet", shape, num_bands),
                      "PCA": build_decomposition("pca", shape, num_bands, fit_data=latents)}
    profiles = {name: band_energy_profile(latents, d) for name, d in decompositions.items()}
    plot_band_energy(profiles, out / "fig3_band_energy.png")

    pca = PCADecomposition.fit(latents.reshape(len(latents), -1), 1)
    top = max(1, int(top_fraction * pca.explained_variance.numel()))
    curves, times = {}, None
    for run in run_dirs:
        dit, flow, _, cfg = load_image_model(run)
        labels = torch.arange(num_trajectories) % cfg["num_classes"] if cfg["num_classes"] else None
        with torch.no_grad():
            _, traj = sample_latents(dit, flow, num_trajectories, labels, steps=steps, method="euler", seed=seed,
                                     return_trajectory=True)
        name = "flow matching" if cfg["num_bands"] == 1 else f"K-Flow {cfg['decomposition']} ({cfg['num_bands']})"
        curves[name] = pca_projection_ratio(traj.reshape(*traj.shape[:2], -1), pca, top)
        times = flow.schedule.time_grid(steps).float()
    plot_projection_ratio(curves, times, out / "fig4_pca_projection.png")
    result = {"band_energy": profiles, "pca_top_components": top, "times": times.tolist(),
              "pca_projection_ratio": {k: v.tolist() for k, v in curves.items()}}
    atomic_write_text(out / "analysis.json", json.dumps(result, indent=1))
    return result
