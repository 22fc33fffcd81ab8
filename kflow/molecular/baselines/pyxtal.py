"""``pyxtal_predictions``: PyXtal random crystals — the molecule alone, packed by ``pyxtal`` in the five most frequent
organic space groups (``PYXTAL_SPACE_GROUPS``) at the density estimated from the molecule, cut to the 17-molecule
cluster and ranked by the physical score ``kflow assemble`` uses. What a chemist would try first.
"""
from __future__ import annotations

import contextlib
import io
import logging
import random
import time
import warnings

import numpy as np
import torch

from kflow.molecular.baselines.shell import shell_predictions

__all__ = ["pyxtal_predictions", "PYXTAL_SPACE_GROUPS"]

logger = logging.getLogger(__name__)

# The five most frequent space groups of organic crystals in the CSD (together ~80 % of its structures).
PYXTAL_SPACE_GROUPS = ("P21/c", "P-1", "P212121", "C2/c", "P21")
# A generated molecule must match the input geometry (or its mirror image) to this RMS, Å; pyxtal copies it exactly.
_RIGID_TOLERANCE = 1e-3


# ------------------------------------------------------------------------------------------------ PyXtal baseline
def _pyxtal_molecule(atomic_numbers: np.ndarray, body: np.ndarray):
    """A ``pyxtal_molecule`` of the geometry ``body`` [P, 3] as it is (no symmetrisation, so atoms keep their order
    and positions)."""
    from ase.data import chemical_symbols
    from pymatgen.core import Molecule
    from pyxtal.molecule import pyxtal_molecule

    return pyxtal_molecule(Molecule([chemical_symbols[int(k)] for k in atomic_numbers], body), symmetrize=False)


def _random_crystal(molecule, group, volume_per_molecule: float, rng: np.random.Generator, max_count: int):
    """One pyxtal random crystal of ``molecule`` in space group ``group`` (symbol or number), the general position
    (Z = its multiplicity) at ``volume_per_molecule`` Å³. Returns (positions [Z, P, 3] Å, whole molecules in the
    molecule's atom order; cell [3, 3], rows = lattice vectors). Raises whatever pyxtal raises when it fails."""
    from pyxtal import pyxtal
    from pyxtal.symmetry import Group

    group = Group(group)
    z = len(group[0])  # general position multiplicity (conventional cell)
    crystal = pyxtal(molecular=True)
    crystal.from_random(3, group.number, [molecule], [z], factor=volume_per_molecule / molecule.volume,
                        random_state=rng, max_count=max_count)
    if not crystal.valid or len(crystal.mol_sites) != 1:
        raise RuntimeError(f"pyxtal returned no valid crystal in {group.symbol}")
    coords, _ = crystal.mol_sites[0].get_coords_and_species(absolute=True)
    p = len(molecule.mol)
    return np.asarray(coords, dtype=np.float64).reshape(-1, p, 3), np.asarray(crystal.lattice.matrix, np.float64)


def _rigid_placement(body: torch.Tensor, copies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Place ``body`` [P, 3] (centred) on each generated molecule ``copies`` [M, P, 3] by the best proper rigid
    motion of the body or of its mirror image (x -> −x), whichever fits better (the proper one on a tie).
    Returns (placed [M, P, 3], mirrored [M] bool, largest RMS residual Å)."""
    from kflow.molecular.geometry import atoms_from_poses, kabsch

    m = len(copies)
    mirror = body * body.new_tensor([-1.0, 1.0, 1.0])
    fits = []
    for b in (body, mirror):
        rot, shift = kabsch(b.expand(m, -1, -1), copies)
        placed = atoms_from_poses(shift, rot, b.expand(m, -1, -1))
        fits.append((placed, (placed - copies).square().sum(-1).mean(-1).sqrt()))
    (proper, res_p), (mirrored, res_m) = fits
    use_mirror = res_m + _RIGID_TOLERANCE < res_p
    placed = torch.where(use_mirror[:, None, None], mirrored, proper)
    residual = torch.where(use_mirror, res_m, res_p)
    return placed, use_mirror, float(residual.max())


def pyxtal_predictions(dataset, seed: int = 0, space_groups=PYXTAL_SPACE_GROUPS, attempts: int = 2,
                       progress: bool = False, max_count: int = 10, info: dict | None = None) -> list[torch.Tensor]:
    """PyXtal random crystals for every cluster of ``dataset`` (items with ``initial_positions`` [N, 3],
    ``atomic_numbers`` [N] and ``molecule_index`` [N], M identical molecules with the same atom order): a list of
    [1, N, 3] predictions in the items' atom order. Only the start is used (never ``final_positions``).

    For each cluster: the molecule is the start's molecule 0 as it is (its geometry, centred). For every space
    group of ``space_groups`` (default ``PYXTAL_SPACE_GROUPS``: P2₁/c, P-1, P2₁2₁2₁, C2/c, P2₁) and each of
    ``attempts`` tries, ``pyxtal`` packs Z copies (Z = the multiplicity of the general position) in a random cell of
    Z × ``estimate_volume_per_molecule`` (the density ``kflow assemble`` assumes for a lone molecule; pyxtal's
    default tolerances, at most ``max_count`` internal retries, and pyxtal may enlarge the cell when it cannot place
    the molecules). The candidate cluster is cut from that crystal as the COD-Cluster17 builder cuts a real one
    (``crystals._neighbour_copies``: the molecule nearest the cell centre, then its M − 1 nearest copies by centroid
    distance; central molecule first), and the input molecule is placed on each generated molecule by Kabsch.
    Candidates are ranked by ``assemble.contact_scores`` / ``rank_samples`` (fewest close contacts, then the most
    compact), the best is kept and shifted to the centre of the start's centroids.

    Mirror images: in centrosymmetric groups (P2₁/c, P-1, C2/c) about half the copies are the mirror image of the
    molecule. They are kept as mirror images — such a copy is an exact rigid copy of the molecule with body
    coordinates x -> −x (centred molecule 0 of the start, mirrored in its start frame), not of the molecule itself —
    as in real centrosymmetric crystals (the metrics compare atom positions, so forcing one hand would misplace
    atoms). For Sohncke groups (P2₁2₁2₁, P2₁) and achiral molecules every copy is a proper rigid copy.

    Failures: a candidate pyxtal cannot generate (an exception, no valid crystal, a cell too small to cut the
    cluster from) is skipped. If every candidate of a cluster fails, the cluster falls back to the evenly spread
    shell (``shell_predictions`` of that cluster, seed ``seed`` + its index); the count is logged as a warning and
    stored in ``info``.

    Seeded and reproducible: candidate k of cluster i draws from ``numpy.random.SeedSequence([seed, i, k])`` (the
    crystal's and the molecule's generators, and pyxtal's few uses of numpy's and Python's global generators, whose
    states are restored afterwards; torch runs on one thread meanwhile). ``info`` (a dict, filled in place):
    ``fallback`` (clusters that fell back), ``fallback_clusters`` (their indices), ``candidates``,
    ``failed_candidates``, ``space_group`` (the chosen group per cluster; None for a fallback), ``mirrored``
    (mirror-image copies per cluster), ``seconds``.
    """
    from tqdm.auto import tqdm

    from kflow.molecular.data.molecules import estimate_volume_per_molecule
    from kflow.molecular.evaluation.contacts import contact_scores, rank_samples
    from kflow.molecular.data.cluster import Cluster
    from kflow.molecular.data.clusters import neighbour_copies as _neighbour_copies
    from kflow.molecular.data.molecules import Molecules
    from kflow.molecular.geometry import index_centroids

    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    space_groups = tuple(space_groups)
    stats = {"fallback": 0, "fallback_clusters": [], "candidates": 0, "failed_candidates": 0, "space_group": [],
             "mirrored": [], "seconds": 0.0}
    start_time = time.perf_counter()
    np_state, py_state, threads = np.random.get_state(), random.getstate(), torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: scoring a candidate is ~7x faster on one thread on a busy machine
    out = []
    try:
        for i in tqdm(range(len(dataset)), desc="pyxtal baseline", unit="cluster", disable=not progress):
            item = dataset[i]
            x0, mol = item.initial_positions.double(), item.molecule_index.long()
            z = item.atomic_numbers.long()
            m = int(mol.max()) + 1
            first = mol == 0
            body = x0[first] - x0[first].mean(0)  # [P, 3] the molecule, centred
            z0 = z[first].numpy()
            start = Cluster(z, mol, x0, x0, f"cluster{i}")  # the start only: final_positions never enter
            volume = estimate_volume_per_molecule(z0, body.numpy())
            centre = index_centroids(x0, mol, m).mean(0)
            candidates, scores, groups = [], [], []
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                try:
                    molecule, problem = _pyxtal_molecule(z0, body.numpy()), None
                except Exception as err:  # every candidate of this cluster fails below
                    molecule, problem = None, err
                k = 0
                for group in space_groups:
                    for _ in range(attempts):
                        seq = np.random.SeedSequence([int(seed), i, k])
                        k += 1
                        stats["candidates"] += 1
                        np.random.seed(seq.generate_state(1)[0])
                        random.seed(int(seq.generate_state(1)[0]))
                        try:
                            if molecule is None:
                                raise RuntimeError(f"pyxtal cannot read the molecule: {problem!r}")
                            lattice_seq, molecule_seq = seq.spawn(2)
                            candidate = molecule.copy()  # pyxtal draws orientations from the molecule's generator
                            candidate.random_state = np.random.default_rng(molecule_seq)
                            pos, cell = _random_crystal(candidate, group, volume, np.random.default_rng(lattice_seq),
                                                        max_count)
                            copies = _neighbour_copies(Molecules(z0, pos, cell), m - 1)  # [M, P, 3]
                            placed, mirrored, residual = _rigid_placement(body, torch.from_numpy(copies))
                            if residual > _RIGID_TOLERANCE:
                                raise RuntimeError(f"generated molecules differ from the input by {residual:.2g} Å")
                        except Exception as err:  # pyxtal fails in many ways (RuntimeError, ValueError, ...)
                            stats["failed_candidates"] += 1
                            logger.debug("pyxtal candidate %d of cluster %d (%s) failed: %r", k - 1, i, group, err)
                            continue
                        placed = placed - placed.mean(1).mean(0) + centre
                        positions = torch.empty_like(x0)
                        for j in range(m):  # molecule j of the candidate -> the item's atoms of molecule j
                            positions[mol == j] = placed[j]
                        candidates.append((positions, int(mirrored.sum())))
                        scores.append(contact_scores(positions, start))
                        groups.append(str(group))
            if not candidates:
                stats["fallback"] += 1
                stats["fallback_clusters"].append(i)
                stats["space_group"].append(None)
                stats["mirrored"].append(0)
                out.append(shell_predictions([item], seed=int(seed) + i)[0])
                continue
            best = rank_samples(scores)[0]
            stats["space_group"].append(groups[best])
            stats["mirrored"].append(candidates[best][1])
            out.append(candidates[best][0][None].to(item.initial_positions.dtype))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.set_num_threads(threads)
    stats["seconds"] = time.perf_counter() - start_time
    if stats["fallback"]:
        logger.warning("pyxtal baseline: %d of %d cluster(s) fell back to the evenly spread shell (every candidate "
                       "failed): %s", stats["fallback"], len(dataset), stats["fallback_clusters"])
    if info is not None:
        info.update(stats)
    return out
