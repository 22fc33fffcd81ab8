"""What the training loop optimises with: the warm-up + cosine LR schedule, the EMA of the weights, and the seeded
per-epoch batch order.
"""
from __future__ import annotations

import math

import torch
from torch import nn


__all__ = ["ExponentialMovingAverage", "cosine_with_warmup", "EpochBatchSampler", "EPOCH_SEED_STRIDE",
           "STEP_SEED_STRIDE", "EMA_WARMUP"]


# Seeds derived from (seed, epoch) and (seed, step): primes larger than any realistic epoch or step count, so
# different runs' seeds do not collide for nearby ``seed`` values.
EPOCH_SEED_STRIDE = 100_003
STEP_SEED_STRIDE = 1_000_003
EMA_WARMUP = 10  # the EMA decay starts at 1/EMA_WARMUP and rises towards ``decay`` as (1 + n) / (EMA_WARMUP + n)


def cosine_with_warmup(step: int, max_steps: int, warmup_steps: int = 0, min_ratio: float = 0.05) -> float:
    """LR multiplier: linear warm-up from 0 to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(max_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ExponentialMovingAverage:
    """fp32 EMA of a model's parameters (and a copy of its buffers), with the usual warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (EMA_WARMUP + self.num_updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict):
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}

    def copy_to(self, model: nn.Module):
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


class EpochBatchSampler:
    """Per-rank batches of an epoch: a (seed, epoch)-seeded permutation cut into global batches of
    ``batch_size × world_size``; rank r takes the r-th contiguous slice of each. Incomplete batches are dropped so
    every rank takes the same number of equally sized steps."""

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.steps_per_epoch = num_items // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"dataset of {num_items} items is smaller than one global batch "
                             f"({batch_size} × {world_size} processes)")

    def batches(self, epoch: int) -> list[list[int]]:
        if self.shuffle:
            seed = self.seed * EPOCH_SEED_STRIDE + epoch
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(self.num_items)
        g = self.batch_size * self.world_size
        out = []
        for s in range(self.steps_per_epoch):
            chunk = order[s * g:(s + 1) * g]
            out.append(chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist())
        return out
