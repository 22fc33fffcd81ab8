"""The image training objective: K-Flow matching from Gaussian noise to the latents, as a ``Trainer`` loss."""
from __future__ import annotations

import torch

from kflow.core import KFlow
from kflow.core.distributed import sample_batch_times

__all__ = ["ImageFlowLoss"]


class ImageFlowLoss:
    """loss_fn(model, (latents [N, C, H, W], labels [N])) for ``kflow.core.training.Trainer``: the K-Flow loss
    (docs/MATH.md §1) from x0 ~ N(0, I) to x1 = the latents at t ~ U(0, 1); labels are passed as ``y`` (the DiT
    drops them for classifier-free guidance training)."""

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
