"""Reading molecular crystals and building COD-Cluster17-style clusters from them.

Pipeline of ``build_cluster`` (vectorised; no Python loop over atoms):
1. bonds under periodic boundary conditions: d_ij < bond_factor × (r_cov,i + r_cov,j) (ase's C neighbour list);
   atoms closer than 0.5 Å are reported as disorder;
2. molecules: connected components of the periodic bond graph, unwrapped by propagating integer cell offsets
   along bonds; a component whose bonds cannot be made consistent is an infinite (polymeric) network;
3. single-component check: every molecule in the cell has the same composition; organic: C and H present;
4. a lattice of molecule copies (molecule centroids + integer cell shifts) large enough to hold the 16 nearest
   neighbours of a central molecule; the central molecule is the one nearest the cell centre;
5. atoms of each molecule in a canonical graph order (RDKit canonical ranks), so all 17 copies share atom order;
6. the initial cluster by an explicit, seeded noise model (``NoiseModel``);
7. both arrangements centred on the initial cluster's centroid, as in COD-Cluster17.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from kflow.molecular.cluster import NUM_MOLECULES, Cluster, InvalidCrystal
from kflow.molecular.so3 import random_rotations

if TYPE_CHECKING:  # ase is imported lazily at run time
    from ase import Atoms

__all__ = ["read_crystals", "build_cluster", "build_clusters", "find_molecules", "NoiseModel"]


# --------------------------------------------------------------------------------------------------- reading
def read_crystals(path: str | os.PathLike, errors: list | None = None) -> Iterator[tuple[str, "Atoms"]]:
    """Yield ``(name, ase.Atoms)`` from a CIF file, a folder of CIFs, an ASE database (.db/.json) or an extxyz file.

    Names come from the CSD refcode where the source has one (ASE db key ``csd_code``, extxyz ``NAME``), else
    from the file name (and the frame/block index). Unreadable entries are skipped; when ``errors`` is a list,
    ``(source, message)`` is appended for each, so one bad file never stops a large build.
    """
    import ase.io

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".cif")
        if not files:
            raise FileNotFoundError(f"{path}: folder contains no .cif files")
        for f in files:
            yield from read_crystals(f, errors)
        return
    suffix = path.suffix.lower()
    if suffix in (".db", ".json"):
        import ase.db

        for row in ase.db.connect(str(path)).select():
            name = row.get("csd_code") or row.get("name") or f"{path.stem}_{row.id}"
            try:
                yield str(name), row.toatoms()
            except Exception as err:  # a broken row must not end the iteration
                _note(errors, f"{path}:{row.id}", err)
        return
    fmt = "cif" if suffix == ".cif" else "extxyz" if suffix in (".xyz", ".extxyz") else None
    try:
        frames = ase.io.read(str(path), index=":", format=fmt)
    except Exception as err:
        _note(errors, str(path), err)
        if errors is None:
            raise ValueError(f"{path}: cannot be read as {fmt or 'a crystal file'} ({err})") from err
        return
    for i, atoms in enumerate(frames):
        name = atoms.info.get("NAME") or atoms.info.get("name") or (
            path.stem if len(frames) == 1 else f"{path.stem}_{i}")
        yield str(name), atoms


def _note(errors, source, err):
    if errors is not None:
        errors.append((source, f"{type(err).__name__}: {err}"))


# -------------------------------------------------------------------------------------------------- molecules
@dataclass
class Molecules:
    """Molecules of one unit cell, unwrapped: ``positions[k]`` [P, 3] Å in canonical atom order."""

    atomic_numbers: np.ndarray  # [P] shared by all molecules
    positions: np.ndarray  # [Z, P, 3]
    cell: np.ndarray  # [3, 3] rows = lattice vectors


def find_molecules(atoms, bond_factor: float = 1.2, min_distance: float = 0.5) -> Molecules:
    """Split a periodic crystal into whole molecules. Raises ``InvalidCrystal`` with reasons
    ``no_lattice``, ``nan``, ``unknown_element``, ``disordered``, ``polymeric``, ``multi_component``,
    ``not_organic``, ``too_small``."""
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list

    if not np.all(atoms.pbc) or atoms.cell.rank != 3:
        raise InvalidCrystal("no_lattice", "the structure has no 3-D periodic cell")
    if not (np.isfinite(atoms.positions).all() and np.isfinite(atoms.cell.array).all()):
        bad = np.nonzero(~np.isfinite(atoms.positions).all(1))[0]
        raise InvalidCrystal("nan", f"non-finite coordinates (atom {bad[0]})" if len(bad) else "non-finite cell")
    if (atoms.numbers < 1).any() or (atoms.numbers > 118).any():
        bad = int(np.nonzero((atoms.numbers < 1) | (atoms.numbers > 118))[0][0])
        raise InvalidCrystal("unknown_element", f"atom {bad} has atomic number {atoms.numbers[bad]} (dummy/unknown)")
    if "occupancy" in atoms.info and any(
            any(v < 0.999 for v in occ.values()) for occ in atoms.info["occupancy"].values()):
        raise InvalidCrystal("disordered", "partial site occupancies")
    z = atoms.numbers
    if not {1, 6} <= set(z.tolist()):
        raise InvalidCrystal("not_organic", "needs both carbon and hydrogen")
    radii = covalent_radii[z] * bond_factor
    i, j, d, shift = neighbor_list("ijdS", atoms, radii)  # pairs with d < r_i·f + r_j·f
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


# -------------------------------------------------------------------------------------------------- noise model
@dataclass
class NoiseModel:
    """How the initial (weakly correlated) cluster is made from the crystal cluster. The original COD-Cluster17
    noise is unpublished; this one is explicit and seeded.

    Each molecule keeps its shape and gets: a Haar-random orientation about its centroid (``rotation="haar"``) or
    a random rotation of at most ``max_angle_deg``; its centroid moved away from the cluster centre by the factor
    ``expansion`` and jittered by isotropic Gaussian noise of ``jitter`` Å. The central molecule is rotated too.
    """

    expansion: float = 1.25
    jitter: float = 0.5
    rotation: str = "haar"  # or "bounded"
    max_angle_deg: float = 180.0

    def apply(self, positions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """positions [M, P, 3] (final cluster) -> initial positions [M, P, 3]."""
        from kflow.molecular.so3 import exp_map

        m = positions.shape[0]
        centroids = positions.mean(1)  # [M, 3]
        centre = centroids.mean(0)
        if self.rotation == "haar":
            rot = random_rotations(m, dtype=positions.dtype, generator=generator)
        elif self.rotation == "bounded":
            axis = torch.nn.functional.normalize(torch.randn(m, 3, generator=generator, dtype=positions.dtype), dim=-1)
            angle = torch.rand(m, 1, generator=generator, dtype=positions.dtype) * np.deg2rad(self.max_angle_deg)
            rot = exp_map(axis * angle)
        else:
            raise ValueError(f"unknown rotation noise {self.rotation!r}; use 'haar' or 'bounded'")
        new_centroids = centre + self.expansion * (centroids - centre) + self.jitter * torch.randn(
            m, 3, generator=generator, dtype=positions.dtype)
        return torch.einsum("mij,mpj->mpi", rot, positions - centroids[:, None]) + new_centroids[:, None]


# ------------------------------------------------------------------------------------------------------ builder
def _neighbour_copies(mols: Molecules, num_neighbors: int, radius: float = 20.0):
    """Central molecule + ``num_neighbors`` nearest copies by centroid distance: [M, P, 3] positions."""
    cell = mols.cell
    centroids = mols.positions.mean(1)  # [Z, 3]
    frac = centroids @ np.linalg.inv(cell)
    centroids = centroids - np.floor(frac) @ cell  # wrap centroids into the cell (molecules move as wholes)
    positions = mols.positions - (np.floor(frac) @ cell)[:, None]
    widths = np.abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    reps = np.ceil(radius / widths).astype(int) + 1
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reps], indexing="ij"), -1).reshape(-1, 3)
    shifts = grid @ cell  # [S, 3]
    centre_point = 0.5 * cell.sum(0)
    central = int(np.argmin(np.linalg.norm(centroids - centre_point, axis=1)))
    copies = centroids[None, :] + shifts[:, None]  # [S, Z, 3]
    dist = np.linalg.norm(copies - centroids[central], axis=-1).reshape(-1)
    order = np.argsort(dist, kind="stable")[: num_neighbors + 1]  # first is the central molecule itself
    reach = np.min(reps * widths)  # any copy farther than this may be missing from the enumerated block
    if dist[order[-1]] >= reach:
        raise InvalidCrystal("cell_too_small", f"neighbour shell reaches {dist[order[-1]]:.1f} Å beyond {reach:.1f} Å")
    s_idx, z_idx = np.divmod(order, len(centroids))
    return positions[z_idx] + shifts[s_idx][:, None]


def build_cluster(atoms, num_neighbors: int = NUM_MOLECULES - 1, seed: int = 0, name: str | None = None,
                  noise: NoiseModel | None = None, bond_factor: float = 1.2, drop_flat: bool = True,
                  flat_tolerance: float = 0.05, min_contact: float = 0.7, molecules: Molecules | None = None,
                  draw: int = 0) -> Cluster:
    """Build one COD-Cluster17-style ``Cluster`` from a periodic molecular crystal (``ase.Atoms``).

    Args:
        num_neighbors: neighbours of the central molecule (16 for COD-Cluster17).
        seed, draw: seed the noise model; ``draw`` selects one of several independent noisy starts per crystal.
        noise: the ``NoiseModel`` (default: Haar rotations, 1.25× expanded and 0.5 Å jittered centroids).
        bond_factor: covalent-radius multiplier for bond perception.
        drop_flat: reject planar/linear molecules (smallest principal RMS extent < ``flat_tolerance`` Å), as
            COD-Cluster17 does, since their inertial frames are degenerate.
        min_contact: reject if two atoms of different molecules are closer than this in the crystal cluster (Å).
        molecules: pre-computed ``find_molecules`` result (re-used across draws).
    Raises ``InvalidCrystal`` with a reason tag (see ``find_molecules`` plus ``flat``, ``cell_too_small``,
    ``overlap``).
    """
    name = name or atoms.info.get("NAME") or atoms.get_chemical_formula()
    mols = molecules if molecules is not None else find_molecules(atoms, bond_factor)
    final = torch.from_numpy(_neighbour_copies(mols, num_neighbors)).double()  # [M, P, 3]
    centred = final[0] - final[0].mean(0)
    extent = torch.linalg.eigvalsh(centred.T @ centred / len(centred)).clamp_min(0).sqrt()
    if drop_flat and extent[0] < flat_tolerance:
        raise InvalidCrystal("flat", f"molecule is planar or linear (smallest principal extent {extent[0]:.3f} Å)")
    m, p, _ = final.shape
    mol_id = torch.arange(m).repeat_interleave(p)
    flat_final = final.reshape(-1, 3)
    closest = torch.cdist(flat_final, flat_final).view(m, p, m, p).amin((1, 3))  # [M, M] closest atom pairs
    closest.fill_diagonal_(float("inf"))
    if closest.min() < min_contact:
        i, j = divmod(int(closest.argmin()), m)
        raise InvalidCrystal("overlap", f"molecules {i} and {j} have atoms {closest.min():.2f} Å apart "
                             f"(< {min_contact} Å)")
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(draw))
    initial = (noise or NoiseModel()).apply(final, gen)
    shift = initial.reshape(-1, 3).mean(0)
    z = torch.from_numpy(np.tile(mols.atomic_numbers, m)).long()
    cluster = Cluster(z, mol_id, (initial.reshape(-1, 3) - shift).float(), (flat_final - shift).float(),
                      f"{name}_draw{draw}", str(name))
    cluster.info["noise"] = asdict(noise or NoiseModel())
    return cluster.validate(num_neighbors + 1)


def build_clusters(source, draws_per_crystal: int = 1, seed: int = 0, summary=None, **kwargs) -> Iterator[Cluster]:
    """Clusters from an iterable of ``(name, atoms)`` (e.g. ``read_crystals(path)``), ``draws_per_crystal`` noisy
    starts each. Rejected crystals are counted in ``summary`` (a ``RejectionSummary``) and skipped."""
    for name, atoms in source:
        try:
            mols = find_molecules(atoms, kwargs.get("bond_factor", 1.2))
            clusters = [build_cluster(atoms, name=name, seed=seed, draw=k, molecules=mols, **kwargs)
                        for k in range(draws_per_crystal)]
        except InvalidCrystal as err:
            if summary is not None:
                summary.reject(err.reason, f"{name}: {err}")
            continue
        except Exception as err:  # an unexpected failure on one crystal must not stop a large build
            if summary is not None:
                summary.reject("error", f"{name}: {type(err).__name__}: {err}")
            continue
        if summary is not None:
            summary.keep()
        yield from clusters
