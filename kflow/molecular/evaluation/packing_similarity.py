"""COMPACK-style packing similarity of two clusters of one rigid molecule (in the spirit of Chisholm &
Motherwell 2005, the CSD's comparison of crystal packings; docs/MATH.md, "Packing similarity").

Each cluster's central molecule (nearest its centroid of centroids) and its ``shell_size`` − 1 nearest neighbours
form the compared shell (15 molecules by default, COMPACK's default). The predicted cluster is superposed on the
true one by the heavy atoms of the two central molecules (a proper rotation, or an improper one when the
prediction is the mirror image: distances cannot tell the two apart). A true neighbour j and a predicted
neighbour k *match* when

- their centroids are closer than ``distance_tolerance`` × the true neighbour's distance from the centre
  (COMPACK: 20 %), and
- the rotation taking k onto j about their centroids is smaller than ``angle_tolerance`` degrees (COMPACK: 20°)
  and leaves an RMS residual below ``rigidity_tolerance`` Å (a mirror image never matches),

one predicted molecule per true one (Hungarian assignment over the feasible pairs, nearest centroids first). The
central molecule counts as matched, so the score is 1..``shell_size``; ``rmsd`` is the heavy-atom RMSD over the
matched molecules after the superposition.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kflow.molecular.geometry import kabsch
from kflow.molecular.so3 import rotation_angle

__all__ = ["PackingSimilarity", "packing_similarity"]


class PackingSimilarity(NamedTuple):
    matched: int  # molecules matched out of shell_size (central included)
    rmsd: float  # Å, heavy atoms of the matched molecules
    shell_size: int


def _shell(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Indices [size] of the central molecule (first) and its size − 1 nearest neighbours; positions [M, P, 3]."""
    centroids = positions.mean(1)
    central = int((centroids - centroids.mean(0)).norm(dim=-1).argmin())
    order = torch.argsort((centroids - centroids[central]).norm(dim=-1), stable=True)
    return order[:size]


def _superpose(mobile: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mobile [N, 3] onto target [N, 3] by the best proper or improper orthogonal map: the 4×4 affine matrix
    applied as x @ A[:3, :3]ᵀ + A[:3, 3]."""
    best = None
    for flip in (1.0, -1.0):
        rot, shift = kabsch(mobile * flip, target)
        err = (mobile * flip @ rot.T + shift - target).square().sum()
        if best is None or err < best[0]:
            best = (err, rot * flip, shift)
    out = torch.eye(4, dtype=mobile.dtype)
    out[:3, :3], out[:3, 3] = best[1], best[2]
    return out


def packing_similarity(true: torch.Tensor, pred: torch.Tensor, heavy: torch.Tensor | None = None,
                       shell_size: int = 15, distance_tolerance: float = 0.2, angle_tolerance: float = 20.0,
                       rigidity_tolerance: float = 0.3) -> PackingSimilarity:
    """Packing similarity of one predicted cluster to the true one.

    Args: true, pred [M, P, 3] atom positions (copies of one molecule in one atom order, molecule-major);
    heavy [P] bool, the atoms compared (default all). Returns ``PackingSimilarity``.
    """
    from scipy.optimize import linear_sum_assignment

    true, pred = true.double(), pred.double()
    heavy = torch.ones(true.shape[1], dtype=torch.bool) if heavy is None else heavy.bool()
    t_idx, p_idx = _shell(true, shell_size), _shell(pred, min(pred.shape[0], shell_size + 4))
    t, p = true[t_idx][:, heavy], pred[p_idx][:, heavy]  # [S, H, 3], [S', H, 3]
    affine = _superpose(p[0], t[0])
    p = p @ affine[:3, :3].T + affine[:3, 3]
    tc, pc = t.mean(1), p.mean(1)  # [S, 3], [S', 3]
    dist = torch.cdist(tc[1:], pc[1:])  # [S−1, S'−1]
    reach = distance_tolerance * (tc[1:] - tc[0]).norm(dim=-1, keepdim=True)  # [S−1, 1]
    s, s2, h = t.shape[0] - 1, p.shape[0] - 1, t.shape[1]
    mob = (p[1:] - pc[1:, None])[None].expand(s, s2, h, 3)
    tgt = (t[1:] - tc[1:, None])[:, None].expand(s, s2, h, 3)
    rot, _ = kabsch(mob, tgt)  # [S−1, S'−1, 3, 3]
    residual = (torch.einsum("jkxy,jkhy->jkhx", rot, mob) - tgt).square().sum(-1).mean(-1).sqrt()
    ok = (dist <= reach) & (rotation_angle(rot) <= math.radians(angle_tolerance)) & (residual <= rigidity_tolerance)
    cost = torch.where(ok, dist, torch.full_like(dist, 1e6)).numpy()
    rows, cols = linear_sum_assignment(cost)
    pairs = [(j, k) for j, k in zip(rows, cols) if ok[j, k]]
    sq = [(t[0] - p[0]).square().sum(-1)] + [(t[1 + j] - p[1 + k]).square().sum(-1) for j, k in pairs]
    return PackingSimilarity(1 + len(pairs), float(torch.cat(sq).mean().sqrt()), shell_size)
