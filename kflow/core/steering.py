"""Steerable generation (paper §4.1, 5.3, 5.4): noise splitting and condition dropping, domain-free."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from kflow.core.decompositions import Decomposition

__all__ = ["share_bands", "ConditionDropping"]


def share_bands(x0: torch.Tensor, decomposition: Decomposition, bands: int | Sequence[int],
                reference: int | torch.Tensor = 0, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Noise splitting: give every sample the same source coefficients in ``bands``; keep its own elsewhere.

    Args:
        x0: source batch [B, ...].
        decomposition: the K-Flow decomposition (acts on the trailing dims of x0).
        bands: band id(s) whose coefficients are shared.
        reference: index into the batch (or a single source sample [...]) that provides the shared coefficients.
        groups: optional LongTensor [B] of group ids: samples share within their group, taking the coefficients
            of the first member of the group (``reference`` is then ignored).
    Returns a new source batch [B, ...]. Sharing the low bands fixes the coarse layout and varies the details;
    sharing the high bands does the reverse.
    """
    c = decomposition(x0)
    mask = decomposition.band_mask(bands).to(c.device)
    if groups is not None:
        groups = torch.as_tensor(groups, device=c.device)
        if groups.shape != (x0.shape[0],):
            raise ValueError(f"groups must have shape [{x0.shape[0]}], got {tuple(groups.shape)}")
        _, inverse = torch.unique(groups, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), x0.shape[0], dtype=torch.long, device=c.device)
        first = first.scatter_reduce(0, inverse, torch.arange(x0.shape[0], device=c.device), reduce="amin")
        shared = c[first[inverse]]
    elif isinstance(reference, int):
        if not -x0.shape[0] <= reference < x0.shape[0]:
            raise IndexError(f"reference {reference} out of range for a batch of {x0.shape[0]}")
        shared = c[reference].expand_as(c)
    else:
        shared = decomposition(reference.to(x0)).expand_as(c)
    return decomposition.inverse(torch.where(mask, shared, c))


class ConditionDropping:
    """Wrap a conditional model so the condition is used only for t < tau and dropped (null label) after.

    The paper keeps the class condition for the first 30% of the path (tau = 0.3): the coarse, low-scale content
    is class-driven and the fine scales are generated unconditionally.

    Args:
        model: callable model(x, t, y=..., **kw).
        tau: switching time in [0, 1].
        null_condition: the value passed as ``y`` after the switch (e.g. the DiT's null-class id).
        condition_key: keyword under which the condition is passed.
    """

    def __init__(self, model: Callable[..., torch.Tensor], tau: float = 0.3, null_condition=None,
                 condition_key: str = "y"):
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        self.model, self.tau, self.null_condition, self.condition_key = model, tau, null_condition, condition_key

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        cond = kwargs.get(self.condition_key)
        if cond is None:
            return self.model(x, t, **kwargs)
        keep = t < self.tau  # [B]
        if bool(keep.all()):
            return self.model(x, t, **kwargs)
        null = torch.full_like(cond, self.null_condition) if not torch.is_tensor(self.null_condition) \
            else self.null_condition.expand_as(cond)
        dropped = torch.where(keep.reshape(-1, *([1] * (cond.dim() - 1))), cond, null)
        return self.model(x, t, **{**kwargs, self.condition_key: dropped})
