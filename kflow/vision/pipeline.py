"""Glue between the core K-Flow engine and image latents: decompositions by name, the training objective for the
``Trainer``, latent caching, guided and steerable sampling."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kflow.core import (BandSchedule, ConditionDropping, FourierDecomposition, IdentityDecomposition, KFlow,
                        PCADecomposition, WaveletDecomposition, share_bands)
from kflow.core.distributed import sample_batch_times
from kflow.utils.io import atomic_path

__all__ = ["DECOMPOSITIONS", "build_decomposition", "ImageFlowLoss", "GuidedModel", "sample_latents",
           "encode_dataset", "write_latent_cache", "read_latent_cache"]

DECOMPOSITIONS = ("none", "fourier", "wavelet", "pca")


def build_decomposition(name: str, latent_shape, num_bands: int, fit_data: torch.Tensor | None = None,
                        wavelet: str = "haar", pca_patch_size: int | None = None):
    """A decomposition of latents [C, H, W] by name. "none" is the one-band flow-matching baseline; "fourier" and
    "wavelet" act on the spatial axes (channels broadcast); "pca" is fitted on ``fit_data`` [N, C, H, W]."""
    c, h, w = latent_shape
    if name == "none":
        if num_bands != 1:
            raise ValueError("decomposition 'none' is the one-band baseline; use num_bands=1")
        return IdentityDecomposition(latent_shape)
    if name == "fourier":
        return FourierDecomposition((h, w), num_bands)
    if name == "wavelet":
        return WaveletDecomposition((h, w), num_bands, wavelet=wavelet)
    if name == "pca":
        if fit_data is None:
            raise ValueError("the PCA decomposition needs fit_data (training latents)")
        return PCADecomposition.fit(fit_data[:4096], num_bands, patch_size=pca_patch_size)
    raise ValueError(f"unknown decomposition {name!r}; choose from {DECOMPOSITIONS}")


class ImageFlowLoss:
    """loss_fn(model, (latents [N, C, H, W], labels [N])) for ``kflow.core.training.Trainer``: K-Flow matching from
    Gaussian noise to the latents; labels are passed as ``y`` (the DiT drops them for CFG training)."""

    def __init__(self, flow: KFlow, conditional: bool):
        self.flow, self.conditional = flow, conditional

    def __call__(self, model, batch):
        z, y = batch
        x0 = torch.randn_like(z)
        t = sample_batch_times(z.shape[0], device=z.device, dtype=z.dtype)
        kwargs = {"y": y} if self.conditional else {}
        loss = self.flow.loss(model, x0, z, t=t, model_kwargs=kwargs)
        return loss, {}


class GuidedModel(nn.Module):
    """Callable model(x, t, y) applying classifier-free guidance with a fixed scale."""

    def __init__(self, dit, cfg_scale: float = 1.0):
        super().__init__()
        self.dit, self.cfg_scale = dit, cfg_scale

    def forward(self, x, t, y=None):
        if y is None:
            return self.dit(x, t)
        return self.dit.forward_with_cfg(x, t, y, self.cfg_scale)


@torch.no_grad()
def sample_latents(dit, flow: KFlow, num_samples: int, labels: torch.Tensor | None = None, steps: int = 50,
                   method: str = "heun", cfg_scale: float = 1.0, condition_tau: float | None = None,
                   noise: torch.Tensor | None = None, share_noise_bands=None, seed: int = 0,
                   return_trajectory: bool = False):
    """Generate latents [N, C, H, W].

    Args:
        labels: class ids for a conditional DiT (None: unconditional).
        cfg_scale: classifier-free guidance scale (1 = plain conditional model).
        condition_tau: keep the class condition only for t < τ and use the null class afterwards (paper §5.4).
        noise: source noise to use (e.g. from ``share_bands``); default i.i.d. Gaussian from ``seed``.
        share_noise_bands: band id(s) whose source noise is shared by the whole batch (noise splitting).
    """
    shape = (num_samples, dit.in_channels, dit.input_size, dit.input_size)
    if noise is None:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(next(dit.parameters()).device)
    if share_noise_bands is not None:
        noise = share_bands(noise, flow.decomposition, share_noise_bands)
    model = GuidedModel(dit, cfg_scale)
    kwargs = {}
    if labels is not None:
        kwargs["y"] = labels.to(noise.device)
        if condition_tau is not None:
            model = ConditionDropping(model, condition_tau, null_condition=dit.num_classes)
    dit.eval()
    return flow.sample(model, noise, steps=steps, method=method, model_kwargs=kwargs,
                       return_trajectory=return_trajectory)


@torch.no_grad()
def encode_dataset(autoencoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    autoencoder.eval()
    return torch.cat([autoencoder.encode(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def write_latent_cache(path: str | os.PathLike, latents: torch.Tensor, labels: torch.Tensor, meta: dict,
                       chunk: int = 1024) -> Path:
    """Store latents once in an LMDB (chunks of ``chunk`` samples), written atomically."""
    import lmdb

    path = Path(path)
    with atomic_path(path, is_dir=True) as tmp:
        env = lmdb.open(str(tmp), map_size=1 << 33, subdir=True, lock=False)
        with env.begin(write=True) as txn:
            for i, s in enumerate(range(0, len(latents), chunk)):
                txn.put(b"%06d" % i, pickle.dumps((latents[s:s + chunk].numpy(), labels[s:s + chunk].numpy())))
            txn.put(b"__meta__", pickle.dumps({**meta, "count": len(latents), "chunks": i + 1}))
        env.close()
    return path


def read_latent_cache(path: str | os.PathLike):
    """(latents [N, C, H, W], labels [N], meta) from a latent cache."""
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            meta = pickle.loads(txn.get(b"__meta__"))
            parts = [pickle.loads(txn.get(b"%06d" % i)) for i in range(meta["chunks"])]
    finally:
        env.close()
    return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
            torch.from_numpy(np.concatenate([p[1] for p in parts])), meta)
