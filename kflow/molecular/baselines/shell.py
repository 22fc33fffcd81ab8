"""Data-free baselines for a start from the molecule alone: what a model must beat before it learns anything.

``shell_predictions``: the evenly spread shell — the central molecule at the centre and the other 16 on
Thomson-like points of a sphere (points repelling each other on the sphere), at the radius of the start cluster,
each with a random orientation. It uses only the start (the molecule and the density it was drawn at), never
the crystal.
"""
from __future__ import annotations


import torch

from kflow.molecular.data.starts import thomson_points
from kflow.molecular.so3 import random_rotations


__all__ = ["shell_predictions"]


def shell_predictions(dataset, seed: int = 0) -> list[torch.Tensor]:
    """Evenly spread shell for every cluster of ``dataset`` (items with ``initial_positions`` [N, 3] and
    ``molecule_index`` [N]): a list of [1, N, 3] predictions in the items' atom order.

    The central molecule (start molecule 0) sits at the centre of the start (the mean of its centroids), the
    others on ``thomson_points`` at radius r = the mean distance of the start's other M − 1 centroids from that
    centre, every molecule with a Haar-random orientation about its centroid (seeded by ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        x0, mol = item.initial_positions.double(), item.molecule_index.long()
        m = int(mol.max()) + 1
        count = torch.bincount(mol, minlength=m).double()[:, None]
        centroids = torch.zeros(m, 3, dtype=x0.dtype).index_add_(0, mol, x0) / count  # [M, 3]
        centre = centroids.mean(0)
        radius = (centroids - centre).norm(dim=-1).sort().values[1:].mean()
        sites = torch.cat([torch.zeros(1, 3, dtype=x0.dtype), radius * thomson_points(m - 1)]) + centre  # [M, 3]
        rot = random_rotations(m, dtype=x0.dtype, generator=gen)  # [M, 3, 3]
        body = x0 - centroids[mol]  # [N, 3]
        placed = torch.einsum("nij,nj->ni", rot[mol], body) + sites[mol]
        out.append(placed[None].to(item.initial_positions.dtype))
    return out
