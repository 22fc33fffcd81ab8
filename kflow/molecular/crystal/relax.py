"""Minimise a given crystal (e.g. the experimental one) with the lattice energy, no symmetry imposed: the cell
and every molecule's pose are free (P1). The landscape check of a search: if the experimental crystal moves far
when minimised, the force field is the limit; if it stays but ranks below the search's minima, the ranking is;
if it ranks first but no candidate reached it, the search is."""
from __future__ import annotations

import numpy as np
import torch

from kflow.molecular.crystal.structure import RigidCrystal
from kflow.molecular.physics.lattice import LatticeEnergy
from kflow.molecular.physics.lbfgs import batched_lbfgs
from kflow.molecular.physics.mmff import MoleculeForceField
from kflow.molecular.so3 import exp_map

__all__ = ["crystal_energy", "relax_crystal"]

STRAIN_SCALE = 10.0  # optimiser units per unit of strain (0.1 strain ≈ 1 Å on a 10 Å edge)
FRACTION_SCALE = 10.0


def crystal_energy(forcefield: MoleculeForceField, crystal: RigidCrystal, **energy_settings) -> float:
    """Lattice energy per molecule (kcal/mol) of ``crystal`` as it is (every molecule a row: no symmetry
    assumed). ``energy_settings`` go to ``LatticeEnergy``."""
    energy = LatticeEnergy(forcefield, **energy_settings)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)[None]  # noqa: E731
    with torch.no_grad():
        return float(energy(t(crystal.cell), t(crystal.centroids), t(crystal.orientations)))


def relax_crystal(forcefield: MoleculeForceField, crystal: RigidCrystal, steps: int = 300,
                  **energy_settings) -> RigidCrystal:
    """``crystal`` minimised over a symmetric cell strain (6), each molecule's fractional centroid (3 Z) and
    rotation (3 Z). Returns the minimised crystal with info energy (kcal/mol per molecule), energy_before,
    volume_change (relative), steps. Its space group is dropped (P1: nothing keeps the symmetry)."""
    energy = LatticeEnergy(forcefield, **energy_settings)
    dtype = torch.float64
    cell0 = torch.as_tensor(crystal.cell, dtype=dtype)
    frac0 = torch.as_tensor(crystal.centroids @ np.linalg.inv(crystal.cell), dtype=dtype)  # [Z, 3]
    q0 = torch.as_tensor(crystal.orientations, dtype=dtype)  # [Z, 3, 3]
    z = crystal.z
    scale = max(energy.radius, 1.0)
    upper = torch.triu_indices(3, 3)

    def decode(x):
        strain = torch.zeros(len(x), 3, 3, dtype=dtype)
        strain[:, upper[0], upper[1]] = x[:, :6] / STRAIN_SCALE
        strain = 0.5 * (strain + strain.transpose(1, 2))
        cell = cell0 @ (torch.eye(3, dtype=dtype) + strain)  # [B, 3, 3]
        frac = frac0 + x[:, 6:6 + 3 * z].reshape(-1, z, 3) / FRACTION_SCALE
        rot = exp_map(x[:, 6 + 3 * z:].reshape(-1, z, 3) / scale) @ q0
        return cell, torch.einsum("bzi,bij->bzj", frac, cell), rot

    def fun(x, index):
        return energy(*decode(x))

    x0 = torch.zeros(1, 6 + 6 * z, dtype=dtype)
    before = float(fun(x0, None).detach())
    result = batched_lbfgs(fun, x0, max_steps=steps)
    cell, centroids, rot = (t[0].detach().numpy() for t in decode(result.x))
    relaxed = RigidCrystal(crystal.name, crystal.atomic_numbers, crystal.body, cell, centroids, rot, None,
                           dict(crystal.info))
    return relaxed.with_info(energy=float(result.energy[0]), energy_before=before,
                             volume_change=relaxed.volume / crystal.volume - 1, steps=int(result.steps[0]))
