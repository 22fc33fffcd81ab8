"""Finding molecules in a periodic crystal: bonds under periodic boundary conditions, connected components
unwrapped by cell offsets, the single-component and organic checks, atoms in a canonical graph order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kflow.molecular.data.cluster import InvalidCrystal

from kflow.molecular.data.bounds import MAX_BONDED_PAIRS_PER_ATOM
from kflow.molecular.data.cif import cif_number


__all__ = ["BOND_FACTOR", "PACKING_COEFFICIENT", "estimate_volume_per_molecule", "find_molecules", "Molecules"]

PACKING_COEFFICIENT = 0.71  # van der Waals volume / crystal volume per molecule, median of CSD-500
BOND_FACTOR = 1.2  # covalent-radius multiplier for bonds, as find_molecules


# -------------------------------------------------------------------------------------------------- molecules
@dataclass
class Molecules:
    """Molecules of one unit cell, unwrapped: ``positions[k]`` [P, 3] Å in canonical atom order."""

    atomic_numbers: np.ndarray  # [P] shared by all molecules
    positions: np.ndarray  # [Z, P, 3]
    cell: np.ndarray  # [3, 3] rows = lattice vectors


def _bonded_pairs(atoms, radii: np.ndarray, chunk: int = 256):
    """``ase.neighborlist.neighbor_list("ijdS", atoms, radii)``: pairs i, j (both directions, images of an atom
    included) with ``|x_j + S·cell - x_i| < radii[i] + radii[j]``, sorted by i, with distances d and cell shifts S,
    in bounded memory. ASE pads every bin to its fullest, so 500 atoms in a 999 Å cell asked for 70 GiB; pymatgen's
    cell-list search (``find_points_in_spheres``) is asked ``chunk`` atoms at a time, and more than
    ``MAX_BONDED_PAIRS_PER_ATOM`` pairs per atom raise ``InvalidCrystal("out_of_bounds")`` before they fill memory."""
    from pymatgen.optimization.neighbors import find_points_in_spheres

    positions = np.ascontiguousarray(atoms.positions, dtype=np.float64)
    cell = np.ascontiguousarray(atoms.cell.array, dtype=np.float64)
    radii = np.asarray(radii, dtype=np.float64)
    n, limit = len(positions), MAX_BONDED_PAIRS_PER_ATOM * len(positions)
    parts, total = [], 0
    for start in range(0, n, chunk):
        i, j, shift, _ = find_points_in_spheres(positions, positions[start:start + chunk],
                                                float(2 * radii.max() + 1e-6), np.ones(3, dtype=np.int64), cell, 1e-8)
        i = np.asarray(i, dtype=np.int64) + start
        j, shift = np.asarray(j, dtype=np.int64), np.rint(shift).astype(np.int64)
        between = positions[j] - positions[i] + shift @ cell  # as ASE computes it: i->j and j->i agree bit for bit
        d = np.sqrt((between * between).sum(1))
        keep = (d < radii[i] + radii[j]) & ~((i == j) & (shift == 0).all(1))
        total += int(keep.sum())
        if total > limit:
            raise InvalidCrystal("out_of_bounds", f"more than {MAX_BONDED_PAIRS_PER_ATOM} bonded neighbours per atom "
                                 f"on average ({total}+ pairs among {n} atoms): atoms this crowded are a broken cell")
        parts.append((i[keep], j[keep], d[keep], shift[keep]))
    i, j, d, shift = (np.concatenate(p) for p in zip(*parts)) if parts else (
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 3), np.int64))
    order = np.lexsort((j, i))
    return i[order], j[order], d[order], shift[order]


def find_molecules(atoms, bond_factor: float = 1.2, min_distance: float = 0.5) -> Molecules:
    """Split a periodic crystal into whole molecules. Raises ``InvalidCrystal`` with reasons
    ``no_lattice``, ``nan``, ``unknown_element``, ``disordered``, ``polymeric``, ``multi_component``,
    ``not_organic``, ``too_small``; ``out_of_bounds`` for atoms piled together (``_bonded_pairs``)."""
    from ase.data import covalent_radii

    if not np.all(atoms.pbc) or atoms.cell.rank != 3:
        raise InvalidCrystal("no_lattice", "the structure has no 3-D periodic cell")
    if not (np.isfinite(atoms.positions).all() and np.isfinite(atoms.cell.array).all()):
        bad = np.nonzero(~np.isfinite(atoms.positions).all(1))[0]
        raise InvalidCrystal("nan", f"non-finite coordinates (atom {bad[0]})" if len(bad) else "non-finite cell")
    if (atoms.numbers < 1).any() or (atoms.numbers > 118).any():
        bad = int(np.nonzero((atoms.numbers < 1) | (atoms.numbers > 118))[0][0])
        raise InvalidCrystal("unknown_element", f"atom {bad} has atomic number {atoms.numbers[bad]} (dummy/unknown)")
    partial = _partial_occupancy(atoms)
    if partial:
        raise InvalidCrystal("disordered", f"partial site occupancy ({partial})")
    z = atoms.numbers
    if not {1, 6} <= set(z.tolist()):
        raise InvalidCrystal("not_organic", "needs both carbon and hydrogen")
    radii = covalent_radii[z] * bond_factor
    i, j, d, shift = _bonded_pairs(atoms, radii)  # pairs with d < r_i·f + r_j·f
    if len(d) and d.min() < min_distance:
        raise InvalidCrystal("disordered", f"atoms {i[d.argmin()]} and {j[d.argmin()]} are {d.min():.2f} Å apart")
    n = len(atoms)
    # Propagate (label, offset): each atom takes the smallest label among bonded atoms, with the cell offset
    # that places it next to them. Converges in at most (molecule diameter in bonds) sweeps.
    label = np.arange(n)
    offset = np.zeros((n, 3), dtype=np.int64)
    for _ in range(n):
        cand_label = label[i]
        # ase: x_j + S·cell is bonded to x_i, so with i placed at x_i + o_i·cell, j belongs at o_j = o_i + S.
        best = np.full(n, n, dtype=np.int64)
        np.minimum.at(best, j, cand_label)
        improve = cand_label == best[j]
        improve &= cand_label < label[j]
        if not improve.any():
            break
        first = np.full(n, -1, dtype=np.int64)
        idx = np.nonzero(improve)[0]
        first[j[idx[::-1]]] = idx[::-1]  # one improving bond per atom (the first)
        upd = first >= 0
        label[upd] = label[i[first[upd]]]
        offset[upd] = offset[i[first[upd]]] + shift[first[upd]]
    # Every bond must agree with the offsets; otherwise the component wraps around the cell (infinite network).
    if len(i) and (offset[j] - offset[i] - shift != 0).any():
        raise InvalidCrystal("polymeric", "bonded network extends through the periodic cell")
    comps, comp = np.unique(label, return_inverse=True)
    sizes = np.bincount(comp)
    frac_shift = offset @ atoms.cell.array  # unwrap
    pos = atoms.positions + frac_shift
    signatures = {tuple(np.sort(z[comp == c])) for c in range(len(comps))}
    if len(signatures) != 1:
        raise InvalidCrystal("multi_component", f"{len(signatures)} different molecules in the cell "
                             f"(sizes {sorted(set(sizes.tolist()))})")
    p = int(sizes[0])
    if p < 3:
        raise InvalidCrystal("too_small", f"molecules of {p} atoms")
    order = [_canonical_order(z[comp == c], pos[comp == c], radii[comp == c]) for c in range(len(comps))]
    numbers = np.stack([z[comp == c][o] for c, o in enumerate(order)])
    if (numbers != numbers[0]).any():
        raise InvalidCrystal("multi_component", "molecules have the same formula but different bonding")
    positions = np.stack([pos[comp == c][o] for c, o in enumerate(order)])
    return Molecules(numbers[0], positions, atoms.cell.array.copy())


def _partial_occupancy(atoms) -> str:
    """The first site with an occupancy below 1 (``atoms.info["occupancy"]`` in ASE's layout), as text, or "".
    Values are read per the CIF conventions (``cif_number``): ``?``, ``.`` or a missing value count as 1, an
    uncertainty is dropped; a value that is not a number at all counts as partial (the site is not certain)."""
    for site, occupancies in (atoms.info.get("occupancy") or {}).items():
        for symbol, value in (occupancies.items() if isinstance(occupancies, dict) else [("?", occupancies)]):
            try:
                occ = cif_number(value, 1.0)
            except (TypeError, ValueError):
                return f"site {site} {symbol}: occupancy {value!r} is not a number"
            if occ < 0.999:
                return f"site {site} {symbol}: {occ:g}"
    return ""


def _canonical_order(z: np.ndarray, pos: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Atom order by RDKit canonical ranks of the bond graph (elements + connectivity), so symmetry copies of a
    molecule list their atoms in the same order."""
    from rdkit import Chem

    mol = Chem.RWMol()
    for zz in z:
        atom = Chem.Atom(int(zz))
        atom.SetNoImplicit(True)
        mol.AddAtom(atom)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    ii, jj = np.nonzero(np.triu(d < radii[:, None] + radii[None], 1))
    for a, b in zip(ii.tolist(), jj.tolist()):
        mol.AddBond(a, b, Chem.BondType.SINGLE)
    ranks = list(Chem.CanonicalRankAtoms(mol, breakTies=True, includeChirality=False))
    return np.argsort(ranks, kind="stable")


# ------------------------------------------------------------------------------------------ volume
def estimate_volume_per_molecule(atomic_numbers: np.ndarray, positions: np.ndarray,
                                 packing: float = PACKING_COEFFICIENT, spacing: float = 0.25) -> float:
    """Crystal volume per molecule (Å³) estimated from the molecule alone: the volume of the union of its Bondi
    van der Waals spheres (counted on a ``spacing`` Å grid) / ``packing``."""
    from ase.data import vdw_radii
    from scipy.spatial import cKDTree

    z, pos = np.asarray(atomic_numbers), np.asarray(positions, dtype=np.float64)
    radii = np.nan_to_num(vdw_radii[z], nan=2.0)
    lo, hi = pos.min(0) - radii.max(), pos.max(0) + radii.max()
    axes = [np.arange(a, b + spacing, spacing) for a, b in zip(lo, hi)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    inside = np.zeros(len(grid), dtype=bool)
    for r in np.unique(radii):  # one tree per radius: a nearest-atom query decides each grid point
        dist, _ = cKDTree(pos[radii == r]).query(grid, distance_upper_bound=r)
        inside |= dist < r
    return float(inside.sum() * spacing ** 3 / packing)


