"""Crystal structure search for one rigid molecule: random symmetric candidates, batched lattice-energy
minimisation, duplicates removed, ranked by energy (docs/MATH.md §9).

The protocol, per space group (candidates of one group share Z and operations, so they form one batch):

1. **Candidates**: a cell of the group's crystal system with random shape at ``start_expansion`` × the estimated
   volume (Z × the molecule's van der Waals volume / 0.71), the molecule's centroid uniform in the cell, its
   orientation Haar-random, the molecule's hand as given. Seeded: candidate i of a search is the same for every
   budget, so a budget of 100 is the first 100 of a budget of 1000.
2. **Compaction**: ``compaction_steps`` of L-BFGS on E + pV (p = ``pressure`` GPa) with the cheap force field
   (``coarse``: short cutoff, Coulomb by molecule cutoff): random cells start too loose to touch, and without the
   push they drift apart.
3. **Relaxation** at p = 0 with the same cheap force field, to convergence.
4. **Refinement**: the ``refine`` lowest (after removing duplicates) are minimised again with Ewald Coulomb and
   atom-pair vdW (``refine_energy``, 10 Å), then ranked by the converged energy (``fine``: 12 Å with the
   dispersion tail, within 0.1 kcal/mol of 24 Å; docs/MATH.md §9) at those minima.

Everything is vectorised over candidates: a search is a handful of batched minimisations, not a loop.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from kflow.molecular.crystal.structure import AMU_PER_A3_TO_G_PER_CM3, RigidCrystal
from kflow.molecular.crystal.symmetry import (CELL_FREE_PARAMETERS, CSD_SHARE, FREQUENT_SPACE_GROUPS, MAX_COS,
                                              SpaceGroup, cell_matrix, space_group)
from kflow.molecular.physics.lattice import LatticeEnergy, cell_volume
from kflow.molecular.physics.lbfgs import batched_lbfgs
from kflow.molecular.physics.mmff import MoleculeForceField
from kflow.molecular.so3 import exp_map, quaternion_to_matrix

__all__ = ["SearchSettings", "SymmetricCrystals", "allocate_budget", "search_crystals", "remove_duplicates",
           "GPA_TO_KCAL_PER_MOL_A3"]

GPA_TO_KCAL_PER_MOL_A3 = 0.143933  # 1 GPa · Å³ = 1e-21 J = 0.1439 kcal/mol
LENGTH_SCALE = 10.0  # optimiser units per unit of log(length): one unit ≈ 1 Å on a 10 Å edge
ANGLE_SCALE = 10.0  # optimiser units per unit of atanh(cos / MAX_COS)
FRACTION_SCALE = 10.0  # optimiser units per unit of fractional coordinate
MIN_FACE_SPACING = 3.0  # Å: thinner cells pay a penalty (a triclinic cell could otherwise fold flat)
PENALTY = 100.0  # kcal/mol/Å² of the face-spacing penalty


@dataclass
class SearchSettings:
    """What one search costs and how it runs; every count multiplies the work (docs/PROMISES.md)."""

    candidates: int = 500  # random crystals, split over the space groups by CSD share (``allocate_budget``)
    space_groups: tuple = FREQUENT_SPACE_GROUPS
    seed: int = 0  # which candidates: candidate i depends on (seed, group, i) only
    start_expansion: float = 1.5  # start cell volume / (Z × estimated volume per molecule)
    pressure: float = 0.1  # GPa, compaction stage
    compaction_steps: int = 60  # L-BFGS steps under pressure
    relax_steps: int = 300  # ... at zero pressure (coarse energy)
    refine: int = 20  # lowest unique coarse minima minimised again with Ewald
    refine_steps: int = 80  # ... in at most this many steps
    batch_size: int = 256  # candidates minimised together (memory grows with it)
    keep: int = 10  # ranked crystals returned
    coarse_tol: float = 1e-3  # kcal/mol: the coarse stages stop when the energy stalls at this level
    coarse: dict = field(default_factory=lambda: {"cutoff": 10.0, "switch_width": 2.0, "electrostatics": "cutoff",
                                                  "vdw_switch": "molecules"})
    refine_energy: dict = field(default_factory=lambda: {"cutoff": 10.0, "switch_width": 2.0,
                                                         "electrostatics": "ewald"})
    fine: dict = field(default_factory=lambda: {"cutoff": 12.0, "switch_width": 2.0, "electrostatics": "ewald"})


def allocate_budget(candidates: int, groups=FREQUENT_SPACE_GROUPS, floor: float = 0.04) -> dict[str, int]:
    """Candidates per space group, in proportion to the group's share of the CSD (at least ``floor`` of the
    budget each), summing to ``candidates``."""
    weights = np.array([max(CSD_SHARE.get(g, floor), floor) for g in groups])
    weights = weights / weights.sum()
    counts = np.floor(weights * candidates).astype(int)
    for i in np.argsort(-(weights * candidates - counts))[: candidates - counts.sum()]:
        counts[i] += 1
    return {g: int(c) for g, c in zip(groups, counts)}


class SymmetricCrystals:
    """Crystals of one molecule in one space group as optimiser vectors x [B, D]: the free cell parameters
    (log lengths, bounded cosines), the molecule's fractional centroid and a rotation vector applied to a
    per-candidate reference orientation Q0 [B, 3, 3]."""

    def __init__(self, group: SpaceGroup, energy: LatticeEnergy, reference: torch.Tensor):
        self.group, self.energy = group, energy
        self.free = CELL_FREE_PARAMETERS[group.system]
        self.angles = [i - 3 for i in self.free if i >= 3]
        self.reference = reference  # [B, 3, 3]
        self.rotation_scale = max(energy.radius, 1.0)
        dtype = energy.body.dtype
        self.rotations = torch.as_tensor(group.rotations, dtype=dtype)  # [Z, 3, 3]
        self.translations = torch.as_tensor(group.translations, dtype=dtype)  # [Z, 3]

    @property
    def dim(self) -> int:
        return 3 + len(self.angles) + 6

    def encode(self, lengths: torch.Tensor, cosines: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
        """x [B, D] of lengths [B, 3], cosines [B, 3] (only the free ones are read) and centroids [B, 3]."""
        cos = (cosines[:, self.angles] / MAX_COS).clamp(-0.999, 0.999)
        return torch.cat([lengths.log() * LENGTH_SCALE, torch.atanh(cos) * ANGLE_SCALE, fractions * FRACTION_SCALE,
                          torch.zeros_like(fractions)], 1)

    def decode(self, x: torch.Tensor, index: torch.Tensor):
        """x [B, D] -> cell [B, 3, 3], centroids [B, Z, 3], orientations [B, Z, 3, 3]."""
        n = len(self.angles)
        lengths = torch.exp(x[:, :3] / LENGTH_SCALE)
        free = MAX_COS * torch.tanh(x[:, 3:3 + n] / ANGLE_SCALE)  # [B, n]
        columns = [free[:, self.angles.index(i)] if i in self.angles else torch.zeros_like(x[:, 0]) for i in range(3)]
        cosines = torch.stack(columns, 1)  # [B, 3]
        cell = cell_matrix(lengths, cosines)  # [B, 3, 3]
        fractions = x[:, 3 + n:6 + n] / FRACTION_SCALE  # [B, 3]
        orientation = exp_map(x[:, 6 + n:] / self.rotation_scale) @ self.reference[index]  # [B, 3, 3]
        copies = torch.einsum("kij,bj->bki", self.rotations, fractions) + self.translations  # [B, Z, 3]
        centroids = torch.einsum("bki,bij->bkj", copies, cell)
        # W_k in Cartesian coordinates: M_k = Lᵀ W_k L⁻ᵀ
        cartesian = cell.transpose(1, 2)[:, None] @ self.rotations[None] @ torch.linalg.inv(cell).transpose(1, 2)[:, None]
        return cell, centroids, cartesian @ orientation[:, None]

    def objective(self, pressure: float = 0.0) -> Callable:
        """fun(x [n, D], index [n]) -> [n]: energy per molecule + pV per molecule + the thin-cell penalty."""
        def fun(x, index):
            cell, centroids, orientations = self.decode(x, index)
            value = self.energy(cell, centroids, orientations, symmetric=True)
            volume = cell_volume(cell)
            if pressure:
                value = value + pressure * GPA_TO_KCAL_PER_MOL_A3 * volume / self.group.z
            spacing = volume[:, None] / torch.linalg.cross(cell[:, [1, 2, 0]], cell[:, [2, 0, 1]]).norm(dim=-1)
            return value + PENALTY * torch.relu(MIN_FACE_SPACING - spacing).square().sum(-1)
        return fun

    def starts(self, count: int, volume: float, expansion: float, generator: torch.Generator) -> torch.Tensor:
        """x [count, D] of random candidates (cell volume = Z × volume × expansion); sets ``reference``."""
        dtype = self.energy.body.dtype
        u = torch.rand(count, 13, generator=generator, dtype=torch.float64).to(dtype)  # one row per candidate
        log_shape = (u[:, :3] - 0.5) * 1.4  # edge ratios up to e^1.4 ≈ 4
        cosines = (u[:, 3:6] - 0.5) * 2 * 0.45 if self.group.system == "triclinic" else \
            torch.stack([torch.zeros(count, dtype=dtype), -0.45 * u[:, 4], torch.zeros(count, dtype=dtype)], 1)
        if self.group.system == "orthorhombic":
            cosines = torch.zeros_like(cosines)
        unit = cell_volume(cell_matrix(torch.exp(log_shape), cosines))
        scale = (self.group.z * volume * expansion / unit) ** (1 / 3)
        lengths = torch.exp(log_shape) * scale[:, None]
        fractions = u[:, 7:10]
        self.reference = uniform_rotations(u[:, 10:13])
        return self.encode(lengths, cosines, fractions)

    def crystals(self, x: torch.Tensor, name: str, atomic_numbers: np.ndarray) -> list[RigidCrystal]:
        cell, centroids, orientations = (t.detach().numpy() for t in self.decode(x, torch.arange(len(x))))
        body = self.energy.body.numpy()
        return [RigidCrystal(name, atomic_numbers, body, cell[i], centroids[i], orientations[i], self.group.symbol)
                for i in range(len(x))]


def uniform_rotations(u: torch.Tensor) -> torch.Tensor:
    """Haar-uniform rotations [n, 3, 3] from uniform numbers u [n, 3] in [0, 1) (Shoemake's unit quaternion)."""
    a, b = (1 - u[:, 0]).sqrt(), u[:, 0].sqrt()
    t1, t2 = 2 * math.pi * u[:, 1], 2 * math.pi * u[:, 2]
    q = torch.stack([b * torch.cos(t2), a * torch.sin(t1), a * torch.cos(t1), b * torch.sin(t2)], -1)
    return quaternion_to_matrix(q)


def neighbour_fingerprint(crystals_model: SymmetricCrystals, x: torch.Tensor, count: int = 16) -> torch.Tensor:
    """Sorted centroid distances [B, count] from molecule 0 to its nearest molecules (duplicates look alike)."""
    with torch.no_grad():
        cell, centroids, _ = crystals_model.decode(x, torch.arange(len(x)))
        _, _, centre, mask = crystals_model.energy.neighbours(cell, centroids, rows=1)
        d = torch.where(mask, centre, torch.full_like(centre, 1e3))[:, 0].sort(-1).values
    return torch.nn.functional.pad(d, (0, max(0, count - d.shape[1])), value=1e3)[:, :count]


def remove_duplicates(energy: np.ndarray, density: np.ndarray, fingerprint: np.ndarray, energy_tol: float = 1.0,
                      distance_tol: float = 0.25, density_tol: float = 0.02) -> np.ndarray:
    """Indices of unique structures, lowest energy first. Two minima are one packing when their energies differ
    by less than ``energy_tol`` kcal/mol, densities by less than ``density_tol`` (relative) and every one of
    their sorted neighbour distances by less than ``distance_tol`` Å (one packing often ends as several minima a
    few tenths of a kcal/mol apart). Vectorised: one [n, n] comparison, then a greedy pass in energy order."""
    order = np.argsort(energy, kind="stable")
    e, rho, fp = energy[order], density[order], fingerprint[order]
    same = ((np.abs(e[:, None] - e[None]) < energy_tol)
            & (np.abs(rho[:, None] - rho[None]) < density_tol * rho[:, None])
            & (np.abs(fp[:, None] - fp[None]).max(-1) < distance_tol))
    keep = np.ones(len(e), dtype=bool)
    for i in range(len(e)):  # greedy over the ranked list: a structure is dropped if a kept, lower one matches it
        if keep[i]:
            keep[i + 1:] &= ~same[i, i + 1:]
    return order[keep & np.isfinite(e)]


def candidate_stream(group: SpaceGroup, model: "SymmetricCrystals", stop: int, volume: float, expansion: float,
                     seed: int) -> torch.Tensor:
    """x [stop, D] of the first ``stop`` candidates of ``group`` (sets ``model.reference``). Candidate i depends
    only on (seed, group, i): a budget of 100 is the first 100 of a budget of 1000."""
    generator = torch.Generator().manual_seed(int(seed) * 1000 + group.number)
    return model.starts(stop, volume, expansion, generator)


def coarse_minima(forcefield: MoleculeForceField, volume_per_molecule: float, symbol: str, start: int, stop: int,
                  settings: SearchSettings) -> dict[str, np.ndarray]:
    """Candidates start..stop−1 of one space group, compacted and relaxed with the coarse force field:
    {"x" [n, D], "reference" [n, 3, 3], "energy" [n], "density" [n] g/cm³, "fingerprint" [n, 16]} (numpy, so a
    study can save it as it goes)."""
    from ase.data import atomic_masses

    dtype = torch.float64
    coarse = LatticeEnergy(forcefield, **settings.coarse, dtype=dtype)
    group = space_group(symbol)
    model = SymmetricCrystals(group, coarse, torch.empty(0, 3, 3, dtype=dtype))
    x0 = candidate_stream(group, model, stop, volume_per_molecule, settings.start_expansion, settings.seed)[start:]
    model.reference = model.reference[start:]
    squeezed = batched_lbfgs(model.objective(settings.pressure), x0, max_steps=settings.compaction_steps,
                             energy_tol=settings.coarse_tol)
    relaxed = batched_lbfgs(model.objective(0.0), squeezed.x, max_steps=settings.relax_steps,
                            energy_tol=settings.coarse_tol)
    x = relaxed.x.detach()
    cell, _, _ = model.decode(x, torch.arange(len(x)))
    mass = float(atomic_masses[forcefield.atomic_numbers].sum())
    density = mass * group.z / cell_volume(cell).detach() * AMU_PER_A3_TO_G_PER_CM3
    return {"x": x.numpy(), "reference": model.reference.numpy(), "energy": relaxed.energy.numpy(),
            "density": density.numpy(), "fingerprint": neighbour_fingerprint(model, x).numpy()}


def refine_minima(forcefield: MoleculeForceField, pools: dict[str, dict], settings: SearchSettings,
                  name: str = "crystal") -> list[RigidCrystal]:
    """The ``refine`` lowest unique coarse minima of ``pools`` ({space group: ``coarse_minima`` output}, candidate
    numbers counted in the pools' order) minimised with the fine force field, duplicates removed again, ranked by
    energy: the ``keep`` best RigidCrystals, info: rank, energy (kcal/mol per molecule), density, space_group,
    candidate, coarse_energy."""
    symbols = [g for g in pools if len(pools[g]["energy"])]
    energy = np.concatenate([pools[g]["energy"] for g in symbols])
    density = np.concatenate([pools[g]["density"] for g in symbols])
    fingerprint = np.concatenate([pools[g]["fingerprint"] for g in symbols])
    owner = np.concatenate([[k] * len(pools[g]["energy"]) for k, g in enumerate(symbols)]).astype(int)
    local = np.concatenate([np.arange(len(pools[g]["energy"])) for g in symbols]).astype(int)
    offsets = np.cumsum([0] + [len(pools[g]["energy"]) for g in symbols])
    unique = remove_duplicates(energy, density, fingerprint)[: settings.refine]
    minimiser = LatticeEnergy(forcefield, **settings.refine_energy, dtype=torch.float64)
    fine = LatticeEnergy(forcefield, **settings.fine, dtype=torch.float64)
    refined = []
    for k, symbol in enumerate(symbols):
        pick = np.sort(local[unique[owner[unique] == k]])
        if len(pick) == 0:
            continue
        pool = pools[symbol]
        model = SymmetricCrystals(space_group(symbol), minimiser, torch.as_tensor(pool["reference"][pick]))
        result = batched_lbfgs(model.objective(0.0), torch.as_tensor(pool["x"][pick]),
                               max_steps=settings.refine_steps)
        x = result.x.detach()
        fp = neighbour_fingerprint(model, x).numpy()
        with torch.no_grad():  # ranked by the converged energy at the minimiser's structure
            final = fine(*model.decode(x, torch.arange(len(x))), symmetric=True)
        for i, crystal in enumerate(model.crystals(x, name, forcefield.atomic_numbers)):
            e = float(final[i])
            refined.append((e, crystal.density, fp[i], crystal.with_info(
                energy=e, density=crystal.density, space_group=symbol, candidate=int(offsets[k] + pick[i]),
                coarse_energy=float(pool["energy"][pick[i]]))))
    if not refined:
        return []
    keep = remove_duplicates(np.array([r[0] for r in refined]), np.array([r[1] for r in refined]),
                             np.stack([r[2] for r in refined]))
    return [refined[i][3].with_info(rank=rank + 1) for rank, i in enumerate(keep[: settings.keep])]


def search_crystals(forcefield: MoleculeForceField, volume_per_molecule: float, settings: SearchSettings,
                    name: str = "crystal", progress: Callable[[str, int, int], None] | None = None) -> dict:
    """The whole search: {"crystals": ``refine_minima``'s ranked list, "minima": {group: coarse minima},
    "seconds": wall time, "candidates": the budget}. ``progress(group, done, total)`` after every batch."""
    start = time.perf_counter()
    budget = allocate_budget(settings.candidates, settings.space_groups)
    pools, done = {}, 0
    for symbol, count in budget.items():
        parts = []
        for lo in range(0, count, settings.batch_size):
            hi = min(lo + settings.batch_size, count)
            parts.append(coarse_minima(forcefield, volume_per_molecule, symbol, lo, hi, settings))
            done += hi - lo
            if progress is not None:
                progress(symbol, done, settings.candidates)
        if parts:
            pools[symbol] = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    crystals = refine_minima(forcefield, pools, settings, name)
    return {"crystals": crystals, "minima": pools, "seconds": time.perf_counter() - start,
            "candidates": settings.candidates}
