"""A crystal of rigid copies of one molecule: cell, centroids and orientations, and what is made from it (CIF
files, ASE atoms, the 17-molecule cluster around one molecule)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np

from kflow.utils.io import atomic_write_text

__all__ = ["RigidCrystal", "orientations_from_copies", "AMU_PER_A3_TO_G_PER_CM3"]

AMU_PER_A3_TO_G_PER_CM3 = 1.66053907  # 1 u/Å³ in g/cm³
RIGID_TOLERANCE = 0.05  # Å, largest atom deviation of a copy from a rigid (possibly mirrored) image of the first


def orientations_from_copies(positions: np.ndarray) -> np.ndarray:
    """Orientations [Z, 3, 3] of copies [Z, P, 3] (same atom order) relative to the first copy's centred body:
    the orthogonal Q (det ±1: a mirror image is allowed) minimising ‖(x_k − c_k) − Q b‖. Raises ValueError when a
    copy is not a rigid image of the first (deviation above ``RIGID_TOLERANCE``)."""
    body = positions[0] - positions[0].mean(0)
    out = []
    for k, x in enumerate(positions):
        centred = x - x.mean(0)
        u, _, vt = np.linalg.svd(centred.T @ body)
        q = u @ vt
        worst = float(np.abs(centred - body @ q.T).max())
        if worst > RIGID_TOLERANCE:
            raise ValueError(f"molecule {k} of the cell is not a rigid copy of molecule 0 (off by {worst:.2f} Å)")
        out.append(q)
    return np.stack(out)


@dataclass
class RigidCrystal:
    """Z rigid copies of one molecule in a periodic cell.

    atomic_numbers [P]; body [P, 3] Å (centred at its centroid); cell [3, 3] (rows: lattice vectors, Å);
    centroids [Z, 3] Å (Cartesian); orientations [Z, 3, 3] (orthogonal; det −1 is the mirror image);
    space_group: the symbol of the group that generated it ("P2_1/c"; None: no symmetry is claimed, P1);
    info: anything else (energy, rank, how it was made), written into CIF comments and summaries."""

    name: str
    atomic_numbers: np.ndarray
    body: np.ndarray
    cell: np.ndarray
    centroids: np.ndarray
    orientations: np.ndarray
    space_group: str | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def from_molecules(cls, name: str, molecules) -> "RigidCrystal":
        """From ``find_molecules``' output (copies [Z, P, 3] in one atom order, a cell)."""
        positions = np.asarray(molecules.positions, dtype=np.float64)
        return cls(name, np.asarray(molecules.atomic_numbers), positions[0] - positions[0].mean(0),
                   np.asarray(molecules.cell, dtype=np.float64), positions.mean(1),
                   orientations_from_copies(positions))

    @property
    def z(self) -> int:
        return len(self.centroids)

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.cell)))

    @property
    def density(self) -> float:
        """g/cm³."""
        from ase.data import atomic_masses

        return float(atomic_masses[self.atomic_numbers].sum() * self.z / self.volume * AMU_PER_A3_TO_G_PER_CM3)

    def positions(self) -> np.ndarray:
        """Atoms of the cell [Z, P, 3] (each molecule whole, centred on its centroid)."""
        return self.centroids[:, None] + np.einsum("zij,pj->zpi", self.orientations, self.body)

    def with_info(self, **info) -> "RigidCrystal":
        return replace(self, info={**self.info, **info})

    def to_ase(self):
        from ase import Atoms

        z = np.tile(self.atomic_numbers, self.z)
        return Atoms(numbers=z, positions=self.positions().reshape(-1, 3), cell=self.cell, pbc=True,
                     info={"name": self.name, **{k: v for k, v in self.info.items()
                                                 if isinstance(v, (int, float, str))}})

    def cluster(self, size: int = 17) -> np.ndarray:
        """Molecule 0 and its ``size`` − 1 nearest neighbours by
        centroid distance over all periodic images, centred on their mean centroid: [size, P, 3]."""
        inverse = np.linalg.inv(self.cell)
        reach = np.ceil(12.0 * np.linalg.norm(inverse, axis=0)).astype(int) + 1
        grid = np.stack(np.meshgrid(*[np.arange(-n, n + 1) for n in reach], indexing="ij"), -1).reshape(-1, 3)
        shifts = grid @ self.cell  # [S, 3]
        centres = (self.centroids[:, None] + shifts[None]).reshape(-1, 3)  # [Z·S, 3]
        order = np.argsort(np.linalg.norm(centres - self.centroids[0], axis=1), kind="stable")[:size]
        molecule = order // len(shifts)
        atoms = centres[order][:, None] + np.einsum("zij,pj->zpi", self.orientations[molecule], self.body)
        return atoms - atoms.reshape(-1, 3).mean(0)

    def cif_text(self) -> str:
        """A CIF of the crystal: with a space group, its operations and the asymmetric unit (molecule 0);
        without, every atom of the cell in P1. Readers (gemmi, ASE, OXtalign) expand it to the same cell."""
        from ase.data import chemical_symbols

        from kflow.molecular.crystal.symmetry import cell_parameters, space_group

        a, b, c, alpha, beta, gamma = cell_parameters(self.cell)
        if self.space_group is not None:
            group = space_group(self.space_group)
            title, number, ops = group.name, group.number, group.operations_xyz
            atoms = self.positions()[:1].reshape(-1, 3)
        else:
            title, number, ops = "P1", 1, ["x,y,z"]
            atoms = self.positions().reshape(-1, 3)
        z = np.tile(self.atomic_numbers, len(atoms) // len(self.atomic_numbers))
        frac = atoms @ np.linalg.inv(self.cell)
        safe = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in self.name) or "crystal"
        lines = [f"data_{safe}"]
        lines += [f"# {key}: {value}" for key, value in self.info.items() if isinstance(value, (int, float, str))]
        lines += [f"_cell_length_a {a:.6f}", f"_cell_length_b {b:.6f}", f"_cell_length_c {c:.6f}",
                  f"_cell_angle_alpha {alpha:.6f}", f"_cell_angle_beta {beta:.6f}", f"_cell_angle_gamma {gamma:.6f}",
                  f"_symmetry_space_group_name_H-M '{title}'", f"_symmetry_Int_Tables_number {number}",
                  "loop_", "_symmetry_equiv_pos_as_xyz", *[f"'{op}'" for op in ops],
                  "loop_", "_atom_site_label", "_atom_site_type_symbol", "_atom_site_fract_x",
                  "_atom_site_fract_y", "_atom_site_fract_z"]
        for i, (number_i, f) in enumerate(zip(z, frac)):
            symbol = chemical_symbols[int(number_i)]
            lines.append(f"{symbol}{i + 1} {symbol} {f[0]:.6f} {f[1]:.6f} {f[2]:.6f}")
        return "\n".join(lines) + "\n"

    def write_cif(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.cif_text())
