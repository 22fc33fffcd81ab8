"""MMFF94 intermolecular parameters of one rigid molecule, read from RDKit (Halgren 1996).

Between atoms of *different* molecules MMFF94 has two terms, both pairwise (docs/MATH.md §9):

    buffered 14-7 van der Waals  E = ε_ij (1.07 R*_ij / (r + 0.07 R*_ij))⁷ (1.12 R*_ij⁷ / (r⁷ + 0.12 R*_ij⁷) − 2)
    buffered Coulomb             E = 332.0716 q_i q_j / (D (r + 0.05)),  D = 1

R*_ij and ε_ij come from ``MMFFMolProperties.GetMMFFVdWParams(i, j)``, which returns the plain pair and then the
pair with MMFF's donor–acceptor correction (R* × 0.8, ε × 0.5 for a polar hydrogen and an acceptor; equal to the
plain pair otherwise); MMFF applies the corrected one, so this module keeps it. The charges are MMFF's partial
charges (``GetMMFFPartialCharge``). A molecule's own atoms never interact through these tables: it is rigid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["COULOMB_CONSTANT", "COULOMB_BUFFER", "MoleculeForceField"]

COULOMB_CONSTANT = 332.0716  # kcal/mol · Å / e², MMFF94's
COULOMB_BUFFER = 0.05  # Å, MMFF94's electrostatic buffer δ in 1 / (r + δ)
VDW_BUFFER_A, VDW_BUFFER_B = 0.07, 0.12  # MMFF94's 14-7 buffers (γ, δ in Halgren 1996)


@dataclass(frozen=True)
class MoleculeForceField:
    """MMFF94 intermolecular parameters of one rigid molecule of P atoms.

    atomic_numbers [P]; body [P, 3] Å, the molecule centred at its centroid (mean of atom positions, the frame
    every pose refers to); charges [P] e (sum ≈ 0 for a neutral molecule); r_star, epsilon [P, P] (Å, kcal/mol),
    symmetric; bonds: how the bonds were found ("template", "DetermineBonds", "DetermineConnectivity")."""

    atomic_numbers: np.ndarray
    body: np.ndarray
    charges: np.ndarray
    r_star: np.ndarray
    epsilon: np.ndarray
    bonds: str

    @property
    def num_atoms(self) -> int:
        return int(len(self.atomic_numbers))

    @property
    def radius(self) -> float:
        """Å, the largest distance of an atom from the centroid."""
        return float(np.sqrt((self.body ** 2).sum(-1)).max())

    @classmethod
    def from_geometry(cls, atomic_numbers, positions, template=None, charge: int = 0) -> "MoleculeForceField":
        """Parameters of the molecule at ``positions`` [P, 3] (Å; the geometry is kept, only centred).

        Bonds (and so MMFF atom types) come from ``template`` (an RDKit molecule with the same atoms in the same
        order, explicit hydrogens) or are perceived from the geometry. Raises ValueError when MMFF94 has no
        parameters for the molecule."""
        from rdkit import Chem
        from rdkit.Chem import rdForceFieldHelpers as helpers

        from kflow.molecular.physics.relax import molecule_from_geometry

        z = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
        x = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        if template is not None:
            mol, bonds = Chem.Mol(template), "template"
            if [a.GetAtomicNum() for a in mol.GetAtoms()] != z.tolist():
                raise ValueError("the template molecule's atoms differ from the given ones (number or order)")
        else:
            mol, bonds = molecule_from_geometry(z, x, charge=charge)
        if not helpers.MMFFHasAllMoleculeParams(mol):
            raise ValueError(f"MMFF94 has no parameters for this molecule (bonds by {bonds}); its lattice energy "
                             f"cannot be computed")
        props = helpers.MMFFGetMoleculeProperties(mol)
        count = len(z)
        charges = np.array([props.GetMMFFPartialCharge(i) for i in range(count)], dtype=np.float64)
        r_star = np.zeros((count, count))
        epsilon = np.zeros((count, count))
        for i in range(count):  # P² RDKit calls, once per molecule (a few ms for 30 atoms)
            for j in range(i, count):
                _, _, r, e = props.GetMMFFVdWParams(i, j)  # the donor-acceptor corrected pair
                r_star[i, j] = r_star[j, i] = r
                epsilon[i, j] = epsilon[j, i] = e
        return cls(z, x - x.mean(0), charges, r_star, epsilon, bonds)
