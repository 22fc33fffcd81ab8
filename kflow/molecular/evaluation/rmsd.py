"""COMPACK-like RMSD_15: the 15 molecules nearest the centre, matched by the Hungarian algorithm.
"""
from __future__ import annotations


import numpy as np
import torch

from kflow.molecular.evaluation.dense import accepts_arrays, densify
from kflow.molecular.geometry import kabsch


__all__ = ["rmsd15"]


# ---------------------------------------------------------------------------------------------------- RMSD_15
@accepts_arrays
@torch.no_grad()
def rmsd15(true_positions: torch.Tensor, pred_positions: torch.Tensor, molecule_index: torch.Tensor,
           atomic_numbers: torch.Tensor, batch: torch.Tensor | None = None, num_molecules: int = 15) -> torch.Tensor:
    """COMPACK-like RMSD of the central molecule and its 14 nearest neighbours (non-hydrogen atoms), per cluster.

    1. In the true cluster take molecule 0 and its ``num_molecules − 1`` nearest molecules by centroid distance.
    2. Superpose the predicted cluster on the true one using the central molecule's heavy atoms (Kabsch): the
       central molecule is defined in both, so this frame does not depend on how the others are labelled.
    3. Match each selected true molecule to a distinct predicted molecule by the Hungarian algorithm on centroid
       distances in that frame (predictions may place molecule j where molecule i belongs; all copies are the same
       molecule, so atom order within a molecule is shared).
    4. Kabsch-superpose the matched heavy atoms of all selected molecules and report their RMSD in Å.
    Returns [B] Å, float64.
    """
    from scipy.optimize import linear_sum_assignment

    d = densify(true_positions.double(), pred_positions.double(), molecule_index, batch, atomic_numbers)
    num_clusters, num_mol = d.true.shape[0], d.num_molecules
    k = min(num_molecules, num_mol)
    heavy = d.mask & (d.z > 1)
    # Per-molecule atom tensors [B, M, P, 3]: atoms of each molecule in their original order.
    onehot = d.mol[..., None] == torch.arange(num_mol, device=d.mol.device)  # [B, A, M]
    per_mol = onehot.sum(1)  # [B, M]
    if (per_mol != per_mol[:, :1]).any():
        raise ValueError("rmsd15 expects identical molecules (same atom count for every molecule in a cluster)")
    p = int(per_mol[0, 0])
    order = torch.argsort((~onehot).transpose(1, 2).to(torch.int8), dim=-1, stable=True)[..., :p]  # [B, M, P]
    gather = lambda x: torch.gather(x[:, None].expand(-1, num_mol, -1, *x.shape[2:]), 2,  # noqa: E731
                                    order.reshape(*order.shape, *([1] * (x.dim() - 2))).expand(
                                        -1, -1, -1, *x.shape[2:]))
    true_m, pred_m, heavy_m = gather(d.true), gather(d.pred), gather(heavy.double())  # [B, M, P, (3)]

    ct = d.true_centroids  # [B, M, 3]
    nearest = torch.argsort((ct - ct[:, :1]).norm(dim=-1), dim=-1)[:, :k]  # [B, k], includes 0 first
    rot, shift = kabsch(pred_m[:, 0], true_m[:, 0], heavy_m[:, 0])
    pred_aligned = torch.einsum("bij,bmpj->bmpi", rot, pred_m) + shift[:, None, None]
    cp = (pred_aligned * heavy_m[..., None]).sum(2) / heavy_m.sum(2)[..., None].clamp_min(1)  # [B, M, 3]
    ct_heavy = (true_m * heavy_m[..., None]).sum(2) / heavy_m.sum(2)[..., None].clamp_min(1)
    sel_true = torch.gather(ct_heavy, 1, nearest[..., None].expand(-1, -1, 3))  # [B, k, 3]
    cost = torch.cdist(sel_true, cp).cpu().numpy()  # [B, k, M]
    matched = np.empty((num_clusters, k), dtype=np.int64)
    for b in range(num_clusters):
        rows, cols = linear_sum_assignment(cost[b])
        matched[b, rows] = cols
    matched = torch.as_tensor(matched, device=d.true.device)
    idx = lambda x, sel: torch.gather(x, 1, sel.reshape(*sel.shape, *([1] * (x.dim() - 2))).expand(  # noqa: E731
        -1, -1, *x.shape[2:]))
    tgt = idx(true_m, nearest).reshape(num_clusters, k * p, 3)
    mob = idx(pred_m, matched).reshape(num_clusters, k * p, 3)
    w = idx(heavy_m, nearest).reshape(num_clusters, k * p)
    rot, shift = kabsch(mob, tgt, w)
    moved = torch.einsum("bij,bpj->bpi", rot, mob) + shift[:, None]
    return (((moved - tgt).pow(2).sum(-1) * w).sum(-1) / w.sum(-1).clamp_min(1)).sqrt()
