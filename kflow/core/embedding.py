"""Time embeddings for K-Flow velocity networks.

``sinusoidal_embedding`` is shared by both domains (DiT's ``TimestepEmbedder`` builds on it). ``BandTimeEmbedding``,
which also feeds the band progress S(t) to the network, is used by the molecular network only: DiT keeps its own
embedder of t alone, and switching it would change the parameters and results of trained image models.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kflow.core.schedule import BandSchedule

__all__ = ["sinusoidal_embedding", "BandTimeEmbedding"]


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1000.0):
    """Sinusoidal features of t ∈ [0, 1]: [B] -> [B, dim]. ``scale`` stretches t to the range DiT was tuned for."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (scale * t.float())[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class BandTimeEmbedding(nn.Module):
    """Band-aware time embedding: MLP([sinusoidal(t), S(t), S′(t)·width]) -> [B, dim].

    Feeding the band progress S(t) tells the network which scales are already data and which are still source,
    which t alone only encodes implicitly through the schedule.
    """

    def __init__(self, dim: int, schedule: BandSchedule | None = None, frequency_dim: int = 64):
        super().__init__()
        self.schedule, self.frequency_dim = schedule, frequency_dim
        k = schedule.num_bands if schedule is not None else 0
        self.mlp = nn.Sequential(nn.Linear(frequency_dim + 2 * k, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = [sinusoidal_embedding(t, self.frequency_dim)]
        if self.schedule is not None:
            width = (self.schedule.ends - self.schedule.starts).to(t.device, torch.float32)
            feats += [self.schedule.s(t).float(), self.schedule.ds(t).float() * width]
        return self.mlp(torch.cat(feats, dim=-1).to(self.mlp[0].weight.dtype))
