"""Collision and separation rates: intermolecular atom pairs closer than a fraction of their van der Waals
radii, and molecules with no neighbour in reach.
"""
from __future__ import annotations


import numpy as np
import torch

from kflow.molecular.evaluation.dense import (CONTACT_CHUNK_ELEMENTS, Dense, accepts_arrays, cdist, cluster_chunks,
                                              densify)


__all__ = ["collision_rate", "separation_rate"]


# ----------------------------------------------------------------------------------------------- contacts
def _radii(z: torch.Tensor, kind: str) -> torch.Tensor:
    from ase.data import covalent_radii, vdw_radii

    table = torch.as_tensor(np.nan_to_num(covalent_radii if kind == "covalent" else vdw_radii, nan=2.0),
                            dtype=torch.float64, device=z.device)
    return table[z]


def _intermolecular_closest(d: Dense, positions: torch.Tensor, radius_kind: str):
    """Per cluster, pairwise intermolecular geometry reduced per molecule pair and per atom pair.

    Yields per chunk: (slice, dist − radius-sum [b, A, A] with +inf on excluded pairs, intermolecular mask)."""
    num_clusters, max_atoms = positions.shape[:2]
    radii = _radii(d.z, radius_kind)  # [B, A]
    for s, e, _, _, _ in cluster_chunks([max_atoms] * num_clusters, CONTACT_CHUNK_ELEMENTS):
        m, mol = d.mask[s:e], d.mol[s:e]
        inter = m[:, :, None] & m[:, None, :] & (mol[:, :, None] != mol[:, None, :])
        gap = cdist(positions[s:e], positions[s:e]) - (radii[s:e, :, None] + radii[s:e, None, :])
        yield s, e, gap.masked_fill(~inter, float("inf")), inter


@accepts_arrays
@torch.no_grad()
def collision_rate(positions: torch.Tensor, molecule_index: torch.Tensor, atomic_numbers: torch.Tensor,
                   batch: torch.Tensor | None = None, tolerance: float = 1.0) -> torch.Tensor:
    """Percentage of intermolecular atom pairs closer than ``tolerance`` × (sum of covalent radii), per cluster.

    Each unordered pair of atoms in different molecules of the same cluster counts once. In a real molecular
    crystal this is 0 (intermolecular contacts are van der Waals, far longer than covalent bonds).
    Returns [B] in %.
    """
    if atomic_numbers is None:
        raise ValueError("collision_rate needs atomic_numbers for the covalent radii")
    d = densify(positions.double(), None, molecule_index, batch, atomic_numbers)
    out = torch.empty(d.true.shape[0], dtype=torch.float64, device=d.true.device)
    radii = _radii(d.z, "covalent")
    num_clusters, max_atoms = d.true.shape[:2]
    for s, e, _, _, _ in cluster_chunks([max_atoms] * num_clusters, CONTACT_CHUNK_ELEMENTS):
        m, mol = d.mask[s:e], d.mol[s:e]
        inter = m[:, :, None] & m[:, None, :] & (mol[:, :, None] != mol[:, None, :])
        limit = tolerance * (radii[s:e, :, None] + radii[s:e, None, :])
        clash = (cdist(d.true[s:e], d.true[s:e]) < limit) & inter
        out[s:e] = 100.0 * clash.sum((1, 2)) / inter.sum((1, 2)).clamp_min(1)
    return out


@accepts_arrays
@torch.no_grad()
def separation_rate(positions: torch.Tensor, molecule_index: torch.Tensor, atomic_numbers: torch.Tensor,
                    batch: torch.Tensor | None = None, margin: float = 0.5) -> torch.Tensor:
    """Percentage of molecules that touch no other molecule, per cluster.

    A molecule is *separated* when, for every atom pair between it and any other molecule, the distance exceeds
    the sum of the two atoms' van der Waals radii by more than ``margin`` Å (default 0.5 Å): it floats free of the
    packing instead of being in van der Waals contact. (Counting molecule pairs whose closest atoms are more than
    0.5 Å apart would count nearly every pair in any cluster; the gap beyond contact distance is the meaningful
    reading, see docs/MATH.md.) In a crystal cluster this is 0. Returns [B] in %.
    """
    if atomic_numbers is None:
        raise ValueError("separation_rate needs atomic_numbers for the van der Waals radii")
    d = densify(positions.double(), None, molecule_index, batch, atomic_numbers)
    num_clusters, m_count = d.true.shape[0], d.num_molecules
    out = torch.empty(num_clusters, dtype=torch.float64, device=d.true.device)
    onehot = (d.mol[..., None] == torch.arange(m_count, device=d.mol.device))  # [B, A, M]
    for s, e, gap, _ in _intermolecular_closest(d, d.true, "vdw"):
        # closest gap of each atom to any atom of another molecule, then min over the molecule's atoms
        atom_gap = gap.min(-1).values  # [b, A]
        mol_gap = atom_gap[..., None].expand(-1, -1, m_count).masked_fill(~onehot[s:e], float("inf")).min(1).values
        out[s:e] = 100.0 * (mol_gap > margin).double().mean(-1)
    return out
