"""Glue between the core K-Flow engine and image latents: decompositions by name, the training objective for the
``Trainer``, latent caching, guided and steerable sampling."""
from __future__ import annotations

import torch
from torch import nn

from kflow.core import (ConditionDropping, FourierDecomposition, IdentityDecomposition, KFlow,
                        PCADecomposition, WaveletDecomposition, share_bands)
from kflow.core.distributed import sample_batch_times

__all__ = ["DECOMPOSITIONS", "build_decomposition", "choose_wavelet", "wavelet_levels", "ImageFlowLoss",
           "GuidedModel", "sample_latents", "encode_dataset"]

DECOMPOSITIONS = ("none", "fourier", "wavelet", "pca")


WAVELET_PREFERENCE = ("db6", "db4", "db2", "haar")  # longest filter first: db6 is the paper's default


def wavelet_levels(size: int, wavelet: str) -> int:
    """How many levels of the boundary-wavelet matrix DWT a signal of ``size`` samples admits: level l (1-based)
    needs its input, of size size / 2^(l-1), at least as long as the filter."""
    import pywt

    length, levels = pywt.Wavelet(wavelet).dec_len, 0
    while size % 2 == 0 and size >= length:
        size, levels = size // 2, levels + 1
    return levels


def choose_wavelet(size: int, num_bands: int) -> str:
    """The longest wavelet of ``WAVELET_PREFERENCE`` with num_bands − 1 levels on a size × size grid."""
    for name in WAVELET_PREFERENCE:
        if wavelet_levels(size, name) >= num_bands - 1:
            return name
    raise ValueError(f"a {size}x{size} grid admits fewer than {num_bands - 1} wavelet levels even with haar; "
                     f"use fewer bands")


def build_decomposition(name: str, latent_shape, num_bands: int, fit_data: torch.Tensor | None = None,
                        wavelet: str | None = None, pca_patch_size: int | None = None):
    """A decomposition of latents [C, H, W] by name.

    "none" is the one-band flow-matching baseline; "fourier" (radial frequency bands) and "wavelet" (band = DWT
    level) act on the spatial axes, channels broadcast; "pca" is fitted on ``fit_data`` [N, C, H, W] (first 4096).
    ``wavelet=None`` picks db6 when the grid admits num_bands − 1 levels of it, else the next shorter of
    db4, db2, haar (``choose_wavelet``); a named wavelet that does not fit raises ``ValueError``.
    """
    c, h, w = latent_shape
    if name == "none":
        if num_bands != 1:
            raise ValueError("decomposition 'none' is the one-band baseline; use num_bands=1")
        return IdentityDecomposition(latent_shape)
    if name == "fourier":
        return FourierDecomposition((h, w), num_bands)
    if name == "wavelet":
        # A named wavelet too long for the grid: WaveletDecomposition raises, naming a shorter one to use.
        return WaveletDecomposition((h, w), num_bands, wavelet=wavelet or choose_wavelet(min(h, w), num_bands))
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
        z, y = batch  # [N, C, H, W], [N]
        self.flow.decomposition.to(z.device)  # no-op after the first batch
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
                   return_trajectory: bool = False, steps_per_band=None):
    """Generate latents [N, C, H, W].

    Args:
        labels: class ids for a conditional DiT (None: unconditional).
        cfg_scale: classifier-free guidance scale (1 = plain conditional model).
        condition_tau: keep the class condition only for t < τ and use the null class afterwards (paper §5.4).
        noise: source noise to use (e.g. from ``share_bands``); default i.i.d. Gaussian from ``seed``.
        share_noise_bands: band id(s) whose source noise is shared by the whole batch (noise splitting).
        steps_per_band: steps inside each band's window (one count per band), instead of ``steps`` uniform steps.
    """
    shape = (num_samples, dit.in_channels, dit.input_size, dit.input_size)
    if noise is None:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(next(dit.parameters()).device)
    flow.decomposition.to(noise.device)
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
                       return_trajectory=return_trajectory, steps_per_band=steps_per_band)


@torch.no_grad()
def encode_dataset(autoencoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images [N, C, H, W] in [0, 1] -> latents [N, *autoencoder.latent_shape], in batches, eval mode."""
    autoencoder.eval()
    return torch.cat([autoencoder.encode(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
