"""Image generation: guided latent sampling and the one batched generate-and-decode loop.

``sample_latents`` integrates the flow for one batch (classifier-free guidance through ``GuidedModel``, optional
condition dropping at τ and shared-band noise); ``generate_images`` runs it batch by batch and decodes the latents
to images. The sampling script, the vision benchmark and the steering figures all generate through these.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kflow.core import ConditionDropping, KFlow, share_bands

__all__ = ["SamplingConfig", "GuidedModel", "sample_latents", "decode_latents", "generate_images"]


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample: integrator (``method`` from ``kflow.core.SAMPLING_METHODS``) and its steps (``steps``
    uniform ones, or ``steps_per_band`` inside each band's window), guidance scale, condition dropping at
    ``condition_tau``, bands whose noise the whole batch shares, seed and batch size."""

    steps: int = 50
    method: str = "heun"
    steps_per_band: tuple[int, ...] | None = None
    cfg_scale: float = 1.0
    condition_tau: float | None = None
    share_noise_bands: tuple[int, ...] | None = None
    seed: int = 0
    batch_size: int = 256


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
                   return_trajectory: bool = False, steps_per_band=None, rtol: float = 1e-5, atol: float = 1e-5):
    """Generate latents [N, C, H, W].

    Args:
        labels: class ids for a conditional DiT (None: unconditional).
        cfg_scale: classifier-free guidance scale (1 = plain conditional model).
        condition_tau: keep the class condition only for t < τ and use the null class afterwards (paper §5.4).
        noise: source noise to use (e.g. from ``share_bands``); default i.i.d. Gaussian from ``seed``.
        share_noise_bands: band id(s) whose source noise is shared by the whole batch (noise splitting).
        steps_per_band: steps inside each band's window (one count per band), instead of ``steps`` uniform steps.
        rtol, atol: tolerances of ``method="dopri5"``.
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
                       return_trajectory=return_trajectory, steps_per_band=steps_per_band, rtol=rtol, atol=atol)


@torch.no_grad()
def decode_latents(autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Latents [N, *latent_shape] -> images [N, C, H, W] clamped to [0, 1]."""
    return autoencoder.decode(latents).clamp(0, 1)


@torch.no_grad()
def generate_images(dit, flow: KFlow, autoencoder, labels: torch.Tensor | None, num_samples: int | None = None,
                    sampling: SamplingConfig = SamplingConfig(), noise: torch.Tensor | None = None) -> torch.Tensor:
    """Images [N, C, H, W] in [0, 1]: latents sampled in batches of ``sampling.batch_size`` and decoded.

    ``labels`` [N] (None: unconditional; then ``num_samples`` gives N). The batch that starts at sample s draws
    its source noise from seed ``sampling.seed + s``, unless ``noise`` [N, C, H, W] is given.
    """
    n = len(labels) if labels is not None else num_samples
    if n is None:
        raise ValueError("generate_images needs labels or num_samples")
    images = []
    for start in range(0, n, sampling.batch_size):
        part = slice(start, min(start + sampling.batch_size, n))
        z = sample_latents(dit, flow, part.stop - start, None if labels is None else labels[part], sampling.steps,
                           sampling.method, sampling.cfg_scale, sampling.condition_tau,
                           noise=None if noise is None else noise[part], share_noise_bands=sampling.share_noise_bands,
                           seed=sampling.seed + start, steps_per_band=sampling.steps_per_band)
        images.append(decode_latents(autoencoder, z))
    return torch.cat(images)
