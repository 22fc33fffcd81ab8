"""What ``kflow assemble`` takes in: ``AssemblyInput`` (a lone molecule or a crystal), the one-line ``InputError``, and
the checks of an input's geometry and of its fit to a model (elements, size).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


from kflow.molecular.data.molecules import BOND_FACTOR


__all__ = ["AssemblyInput", "InputError", "check_input", "MIN_ATOM_DISTANCE", "MAX_MOLECULE_ATOMS",
           "MOLECULE_SUFFIXES", "CRYSTAL_SUFFIXES", "DATABASE_SUFFIXES"]


MIN_ATOM_DISTANCE = 0.5  # Å: closer atoms are a broken structure (duplicates, disorder)
# Atoms per molecule checked before any pairwise geometry (an N x N x 3 distance array of a 20,000-atom XYZ is
# 9 GB); far above any shipped model's max_atoms, which check_input applies after the model is loaded.
MAX_MOLECULE_ATOMS = 1000
MOLECULE_SUFFIXES = (".sdf", ".mol", ".mol2")  # read by RDKit; everything else by ASE or the CIF reader
CRYSTAL_SUFFIXES = (".cif",)
DATABASE_SUFFIXES = (".db", ".json")  # ASE databases (ase.db): SQLite or JSON, read alike


class InputError(ValueError):
    """An input ``kflow assemble`` cannot use; the message is one line: ``<input>: <reason>: <detail>``."""

    def __init__(self, source: str, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{source}: {reason}: {detail}")


@dataclass
class AssemblyInput:
    """One input: a lone molecule (``kind="molecule"``) or a crystal (``kind="crystal"``, with its ``atoms`` and
    ``molecules``). ``atomic_numbers`` [P] and ``positions`` [P, 3] (Å, float64) are the molecule's geometry (for a
    crystal: one molecule of the cell, in the canonical atom order every copy shares)."""

    kind: str
    name: str
    source: str
    reader: str
    atomic_numbers: np.ndarray
    positions: np.ndarray
    atoms: object = None  # ase.Atoms of the crystal
    molecules: object = None  # crystals.Molecules of the crystal
    smiles: str | None = None
    notes: list = field(default_factory=list)

    @property
    def formula(self) -> str:
        from ase import Atoms

        return Atoms(numbers=self.atomic_numbers).get_chemical_formula()


def covalent_bonds(z: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Covalent bonds [E, 2] (i < j) of one molecule: d < 1.2 × (r_cov,i + r_cov,j)."""
    from ase.data import covalent_radii

    radii = covalent_radii[z] * BOND_FACTOR
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    return np.argwhere(np.triu(d < radii[:, None] + radii[None], 1))


def check_geometry(inp: AssemblyInput) -> None:
    """What a lone molecule must satisfy (crystals are checked by ``find_molecules`` / ``build_cluster``)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    z, pos, source = inp.atomic_numbers, inp.positions, inp.source
    if len(z) == 0:
        raise InputError(source, "no_atoms", "the structure has no atoms")
    if (z < 1).any() or (z > 118).any():
        raise InputError(source, "unknown_element", f"atom {int(np.nonzero((z < 1) | (z > 118))[0][0])} is not a "
                         "chemical element (dummy or unknown atom)")
    if not np.isfinite(pos).all():
        raise InputError(source, "nan", "non-finite coordinates")
    if inp.kind == "crystal":
        return
    if len(z) < 3:
        raise InputError(source, "too_small", f"{len(z)} atoms; a molecule needs at least 3 for a rigid orientation")
    if len(z) > MAX_MOLECULE_ATOMS:
        raise InputError(source, "too_large", f"{len(z)} atoms; kflow assemble takes molecules of at most "
                         f"{MAX_MOLECULE_ATOMS} atoms (the models far fewer)")
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.eye(len(z)) * 1e9
    if d.min() < MIN_ATOM_DISTANCE:
        i, j = np.unravel_index(d.argmin(), d.shape)
        raise InputError(source, "overlapping_atoms", f"atoms {i} and {j} are {d.min():.2f} Å apart")
    bonds = covalent_bonds(z, pos)
    graph = coo_matrix((np.ones(len(bonds)), (bonds[:, 0], bonds[:, 1])), shape=(len(z), len(z)))
    count, label = connected_components(graph, directed=False)
    if count > 1:
        from ase import Atoms

        parts = [Atoms(numbers=z[label == c]).get_chemical_formula() for c in range(count)]
        raise InputError(source, "multi_component", f"{count} disconnected fragments ({', '.join(parts[:6])}"
                         f"{', ...' if count > 6 else ''}): kflow assemble packs one kind of molecule (a salt, "
                         "solvate or mixture needs all of its components, which it cannot model)")
    centred = pos - pos.mean(0)
    extent = np.sqrt(np.clip(np.linalg.eigvalsh(centred.T @ centred / len(z)), 0, None))
    if extent[1] < 0.05:
        raise InputError(source, "linear", "the molecule is linear: its orientation about the axis is undefined")


def check_input(inp: AssemblyInput, meta: dict, model_name: str = "the model") -> None:
    """Refuse a molecule the model has not learnt: elements outside ``meta["elements"]``, more atoms than
    ``meta["max_atoms"]``."""
    from ase.data import chemical_symbols

    known = set(meta["elements"])
    unknown = sorted(set(inp.atomic_numbers.tolist()) - known)
    if unknown:
        raise InputError(inp.source, "unknown_element", f"{model_name} was trained on "
                         f"{', '.join(chemical_symbols[z] for z in sorted(known))} only; this molecule has "
                         f"{', '.join(chemical_symbols[z] for z in unknown)}")
    size = len(inp.atomic_numbers)
    if size > meta["max_atoms"]:
        raise InputError(inp.source, "too_large", f"{size} atoms per molecule; {model_name} has seen molecules of "
                         f"at most {meta['max_atoms']} atoms")
