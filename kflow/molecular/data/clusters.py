"""Building COD-Cluster17-style clusters from them.

Pipeline of ``build_cluster`` (vectorised; no Python loop over atoms):
1. bonds under periodic boundary conditions: d_ij < bond_factor × (r_cov,i + r_cov,j) (ase's C neighbour list);
   atoms closer than 0.5 Å are reported as disorder;
2. molecules: connected components of the periodic bond graph, unwrapped by propagating integer cell offsets
   along bonds; a component whose bonds cannot be made consistent is an infinite (polymeric) network;
3. single-component check: every molecule in the cell has the same composition; organic: C and H present;
   planar molecules are accepted, linear ones rejected (their orientation about the axis is undefined);
4. a lattice of molecule copies (molecule centroids + integer cell shifts) large enough to hold the 16 nearest
   neighbours of a central molecule; the central molecule is the one nearest the cell centre;
5. atoms of each molecule in a canonical graph order (RDKit canonical ranks), so all 17 copies share atom order;
6. the initial cluster by an explicit, seeded noise model (``NoiseModel``);
7. both arrangements centred on the initial cluster's centroid, as in COD-Cluster17.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Iterator

import numpy as np
import torch

from kflow.molecular.data.cluster import NUM_MOLECULES, Cluster, InvalidCrystal

from kflow.molecular.data.molecules import Molecules, find_molecules
from kflow.molecular.data.starts import NoiseModel, noise_model


__all__ = ["build_cluster", "build_clusters"]


# ------------------------------------------------------------------------------------------------------ builder
def neighbour_copies(mols: Molecules, num_neighbors: int, radius: float = 20.0):
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
    # Symmetry makes exact ties common (e.g. two molecules related by an inversion centre at the cell centre):
    # distances are compared rounded to 1e-6 Å, so rounding noise in the input never decides a tie; ties go to the
    # lower index (file order of the molecules, then of the lattice shifts).
    central = int(np.argmin(np.round(np.linalg.norm(centroids - centre_point, axis=1), 6)))
    copies = centroids[None, :] + shifts[:, None]  # [S, Z, 3]
    dist = np.linalg.norm(copies - centroids[central], axis=-1).reshape(-1)
    order = np.argsort(np.round(dist, 6), kind="stable")[: num_neighbors + 1]  # first: the central molecule
    reach = np.min(reps * widths)  # any copy farther than this may be missing from the enumerated block
    if dist[order[-1]] >= reach:
        raise InvalidCrystal("cell_too_small", f"neighbour shell reaches {dist[order[-1]]:.1f} Å beyond {reach:.1f} Å")
    s_idx, z_idx = np.divmod(order, len(centroids))
    return positions[z_idx] + shifts[s_idx][:, None]


def build_cluster(atoms, num_neighbors: int = NUM_MOLECULES - 1, seed: int = 0, name: str | None = None,
                  noise: "str | NoiseModel | None" = None, bond_factor: float = 1.2, drop_flat: bool = False,
                  flat_tolerance: float = 0.05, min_contact: float = 0.7, molecules: Molecules | None = None,
                  draw: int = 0) -> Cluster:
    """Build one COD-Cluster17-style ``Cluster`` from a periodic molecular crystal (``ase.Atoms``).

    Args:
        num_neighbors: neighbours of the central molecule (16 for COD-Cluster17).
        seed, draw: seed the noise model; ``draw`` selects one of several independent noisy starts per crystal.
        noise: the start distribution: a preset name ("mild", the default: Haar rotations, 1.25× expanded and
            0.5 Å jittered centroids; "hard": random placement at crystal density) or a ``NoiseModel``.
        bond_factor: covalent-radius multiplier for bond perception.
        drop_flat: also reject planar molecules (smallest principal RMS extent < ``flat_tolerance`` Å; reason
            ``flat``), as COD-Cluster17 does. Off by default: planar molecules (benzene, naphthalene, most organic
            semiconductors) are accepted, since the rigid-body chart takes rotations relative to the start pose and
            needs no principal axes, and ``geometry.inertial_axes`` has a deterministic convention for them.
            Linear molecules (the two smallest extents < ``flat_tolerance``) are always rejected (``linear``): a
            rotation about their axis moves no atom, so their orientation is undefined.
        min_contact: reject if two atoms of different molecules are closer than this in the crystal cluster (Å).
        molecules: pre-computed ``find_molecules`` result (re-used across draws).
    Raises ``InvalidCrystal`` with a reason tag (see ``find_molecules`` plus ``linear``, ``flat`` (with
    ``drop_flat``), ``cell_too_small``, ``overlap``).
    """
    name = name or atoms.info.get("NAME") or atoms.get_chemical_formula()
    mols = molecules if molecules is not None else find_molecules(atoms, bond_factor)
    final = torch.from_numpy(neighbour_copies(mols, num_neighbors)).double()  # [M, P, 3]
    centred = final[0] - final[0].mean(0)
    extent = torch.linalg.eigvalsh(centred.T @ centred / len(centred)).clamp_min(0).sqrt()
    if extent[1] < flat_tolerance:
        raise InvalidCrystal("linear", f"molecule is linear (principal extents {extent[0]:.3f}, {extent[1]:.3f} Å): "
                             "its orientation about the axis is undefined")
    if drop_flat and extent[0] < flat_tolerance:
        raise InvalidCrystal("flat", f"molecule is planar (smallest principal extent {extent[0]:.3f} Å) and "
                             "drop_flat is set")
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
    noise = noise_model(noise)
    volume_per_molecule = abs(float(np.linalg.det(mols.cell))) / len(mols.positions)
    initial = noise.apply(final, gen, volume_per_molecule)
    shift = initial.reshape(-1, 3).mean(0)
    z = torch.from_numpy(np.tile(mols.atomic_numbers, m)).long()
    cluster = Cluster(z, mol_id, (initial.reshape(-1, 3) - shift).float(), (flat_final - shift).float(),
                      f"{name}_draw{draw}", str(name))
    cluster.info["noise"] = asdict(noise)
    cluster.info["volume_per_molecule"] = volume_per_molecule  # redrawing a start needs the crystal's density
    return cluster.validate(num_neighbors + 1)


def build_clusters(source, draws_per_crystal: int = 1, seed: int = 0, summary=None, **kwargs) -> Iterator[Cluster]:
    """Clusters from an iterable of ``(name, atoms)`` (e.g. ``read_crystals(path)``), ``draws_per_crystal`` noisy
    starts each. Rejected crystals are counted in ``summary`` (a ``RejectionSummary``, per input file when the
    atoms carry ``info["source"]``) and skipped."""
    for name, atoms in source:
        origin, reader = atoms.info.get("source"), atoms.info.get("reader")
        try:
            mols = find_molecules(atoms, kwargs.get("bond_factor", 1.2))
            clusters = [build_cluster(atoms, name=name, seed=seed, draw=k, molecules=mols, **kwargs)
                        for k in range(draws_per_crystal)]
        except InvalidCrystal as err:
            if summary is not None:
                summary.reject(err.reason, f"{name}: {err}", source=origin)
            continue
        except Exception as err:  # an unexpected failure on one crystal must not stop a large build
            if summary is not None:
                summary.reject("error", f"{name}: {type(err).__name__}: {err}", source=origin)
            continue
        if summary is not None:
            summary.keep(source=origin, reader=reader)
        yield from clusters
