"""Physical plausibility of a cluster without a reference: close contacts, compactness, collisions and separation
(``contact_scores``), and the ranking of samples by them (``rank_samples``), used by ``kflow assemble``, the
baselines, the relaxation and the workflow.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kflow.molecular.data.cluster import Cluster
from kflow.molecular.data.molecules import BOND_FACTOR

__all__ = ["contact_scores", "rank_samples", "CONTACT_FACTOR", "HBOND_CONTACT_FACTOR"]

CONTACT_FACTOR = 0.75  # close contact: distance < factor × (r_vdw,i + r_vdw,j)
HBOND_CONTACT_FACTOR = 0.5  # ... for H(on N/O/F)···N/O/F pairs, whose hydrogen bonds are far shorter
_POLAR = (7, 8, 9)


def contact_scores(positions: torch.Tensor, cluster: Cluster) -> dict:
    """Physical plausibility of one cluster's positions [N, 3] without a reference: close contacts (pairs of atoms
    in different molecules closer than ``CONTACT_FACTOR`` × the sum of Bondi radii, ``HBOND_CONTACT_FACTOR`` × for
    polar-H···N/O/F), the radius of gyration of the molecule centroids (Å; compactness), and the collision and
    separation rates of ``metrics`` (%)."""
    from ase.data import vdw_radii

    from kflow.molecular.geometry import index_centroids
    from kflow.molecular.evaluation.collisions import collision_rate, separation_rate

    x = positions.double()
    z, mol = cluster.atomic_numbers, cluster.molecule_index
    radii = torch.from_numpy(np.nan_to_num(vdw_radii, nan=2.0))[z]
    bonded_h = _polar_hydrogens(x, z, mol)
    acceptor = torch.isin(z, torch.tensor(_POLAR))
    hbond = (bonded_h[:, None] & acceptor[None]) | (acceptor[:, None] & bonded_h[None])
    factor = torch.where(hbond, HBOND_CONTACT_FACTOR, CONTACT_FACTOR)
    inter = mol[:, None] != mol[None]
    close = (torch.cdist(x, x) < factor * (radii[:, None] + radii[None])) & inter
    centroids = index_centroids(x, mol, cluster.num_molecules)
    rg = (centroids - centroids.mean(0)).square().sum(-1).mean().sqrt().item()
    return {"close_contacts": int(close.sum().item() // 2), "radius_of_gyration": rg,
            "collision_pct": float(collision_rate(x, mol, z)[0]),
            "separation_pct": float(separation_rate(x, mol, z)[0])}


def _polar_hydrogens(x: torch.Tensor, z: torch.Tensor, mol: torch.Tensor) -> torch.Tensor:
    """[N] bool: hydrogens bonded (within their own molecule) to N, O or F."""
    from ase.data import covalent_radii

    cov = torch.from_numpy(covalent_radii)[z] * BOND_FACTOR
    bonded = (torch.cdist(x, x) < cov[:, None] + cov[None]) & (mol[:, None] == mol[None])
    polar = torch.isin(z, torch.tensor(_POLAR))
    return (z == 1) & (bonded & polar[None]).any(1)


def rank_samples(scores: Sequence[dict]) -> list[int]:
    """Sample indices, best first: fewest close contacts, then the lowest MMFF intermolecular energy where the
    samples were relaxed (``mmff_energy``), else the most compact (smallest centroid radius of gyration), then the
    lower index."""
    def key(k):
        second = scores[k].get("mmff_energy", scores[k]["radius_of_gyration"])
        return scores[k]["close_contacts"], second, k

    return sorted(range(len(scores)), key=key)


