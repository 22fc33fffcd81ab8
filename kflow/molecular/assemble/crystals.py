"""From a molecule to ranked crystal structures: ``predict_crystals`` (``kflow crystal``).

The molecule (SMILES, a molecule file, or a crystal whose molecule is taken) is kept rigid; ``kflow.molecular.
crystal.search_crystals`` draws ``candidates`` symmetric crystals in the frequent organic space groups, minimises
their MMFF94 lattice energy and ranks the unique minima. For a crystal input every prediction is also scored
against it with OXtalign (the open COMPACK-equivalent RMSD₁₅: molecules matched of 15) and the matched PM-center of
the cut 17-molecule clusters. Measured cost: docs/PROMISES.md (``SECONDS_PER_CANDIDATE``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kflow.molecular.assemble.inputs import AssemblyInput, InputError
from kflow.molecular.assemble.readers import read_assembly_input
from kflow.molecular.crystal.search import SearchSettings, allocate_budget, search_crystals
from kflow.molecular.crystal.structure import RigidCrystal
from kflow.molecular.crystal.symmetry import FREQUENT_SPACE_GROUPS
from kflow.molecular.data.molecules import estimate_volume_per_molecule
from kflow.utils.cli import check_seed
from kflow.utils.io import one_writer

__all__ = ["predict_crystals", "CrystalPrediction", "MAX_CANDIDATES", "MAX_CRYSTAL_ATOMS", "SECONDS_PER_CANDIDATE",
           "DEFAULT_CANDIDATES", "score_against"]

DEFAULT_CANDIDATES = 500
MAX_CANDIDATES = 20_000  # a budget above this is refused: hours of CPU (see SECONDS_PER_CANDIDATE)
MAX_CRYSTAL_ATOMS = 120  # atoms per molecule; the atom-pair cost grows as atoms², beyond this a search takes days
# Measured on CSD-500 test crystals (23-42 atoms, one core, 2026-12): coarse minimisation plus refinement of the
# lowest 20, per candidate at a budget of 100; the refinement's share falls with larger budgets.
SECONDS_PER_CANDIDATE = 0.5


@dataclass
class CrystalPrediction:
    """Ranked crystals of one molecule. crystals: ``RigidCrystal`` list (rank 1 = lowest lattice energy; info:
    rank, energy kcal/mol per molecule, density g/cm³, space_group, candidate); scores: per crystal, against the
    input crystal (empty for a lone molecule): n_matched (of 15), rmsd15 (Å, over the matched molecules),
    pm_center_matched (Å); summary: what ``summary.json`` holds."""

    name: str
    crystals: list[RigidCrystal]
    scores: list[dict]
    summary: dict
    minima: dict = field(default_factory=dict, repr=False)

    def write_and_return(self, out: str | os.PathLike) -> "CrystalPrediction":
        self.write(out)
        return self

    def clusters(self) -> list[np.ndarray]:
        """The 17-molecule cluster around molecule 0 of each crystal [17, P, 3] (Å)."""
        return [crystal.cluster(17) for crystal in self.crystals]

    def write(self, out: str | os.PathLike) -> list[str]:
        """rank_01.cif ... (space group and asymmetric unit), rank_01_cluster.extxyz ... (the cut clusters),
        landscape.png (every minimum's energy against density) and summary.json, all at once or none; one writer
        at a time (``kflow.utils.io.one_writer``)."""
        check_out_folder(Path(out))
        with one_writer(out, "kflow crystal"):
            return self._write(out)

    def _write(self, out: str | os.PathLike) -> list[str]:
        import ase.io
        from ase import Atoms

        from kflow.molecular.data.store import staged_folder

        out = Path(out)
        check_out_folder(out)
        files = []
        with staged_folder(out) as stage:
            stage.mkdir()
            for crystal, cluster in zip(self.crystals, self.clusters()):
                rank = int(crystal.info["rank"])
                crystal.write_cif(stage / f"rank_{rank:02d}.cif")
                z = np.tile(crystal.atomic_numbers, len(cluster))
                mol = np.repeat(np.arange(len(cluster)), len(crystal.atomic_numbers))
                atoms = Atoms(numbers=z, positions=cluster.reshape(-1, 3), info={"name": self.name, "rank": rank})
                atoms.new_array("mol_idx", mol)
                ase.io.write(stage / f"rank_{rank:02d}_cluster.extxyz", atoms, format="extxyz")
                files += [f"rank_{rank:02d}.cif", f"rank_{rank:02d}_cluster.extxyz"]
            if self.minima:
                plot_landscape(self, stage / "landscape.png")
                files.append("landscape.png")
            files.append("summary.json")
            (stage / "summary.json").write_text(json.dumps({**self.summary, "files": files}, indent=1,
                                                           default=float) + "\n")
        return files


OUTPUT_PATTERNS = {"rank_*.cif": None, "rank_*_cluster.extxyz": None, "landscape.png": None, "summary.json": None}


def check_out_folder(out: Path) -> None:
    """The folder is replaced as a whole: refuse one holding anything ``kflow crystal`` did not write."""
    from kflow.utils.io import check_replaceable_folder

    check_replaceable_folder(out, OUTPUT_PATTERNS, "kflow crystal")


def plot_landscape(prediction: CrystalPrediction, path: Path) -> None:
    """Energy against density of every candidate after the coarse minimisation (grey: the cheap force field, not
    comparable with the ranked energies) and of the ranked crystals (coloured by space group, converged energy),
    the input crystal's density as a line when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for pool in prediction.minima.values():
        ax.scatter(pool["density"], pool["energy"], s=6, c="0.75", lw=0, label="every candidate (coarse energy)")
    groups = sorted({c.info["space_group"] for c in prediction.crystals})
    colours = dict(zip(groups, plt.cm.tab10.colors))
    for crystal in prediction.crystals:
        ax.scatter(crystal.density, crystal.info["energy"], s=28, color=colours[crystal.info["space_group"]],
                   label=crystal.info["space_group"].replace("_", ""), edgecolor="k", lw=0.4)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    truth = prediction.summary.get("input_crystal")
    if truth:
        ax.axvline(truth["density"], color="k", ls="--", lw=0.8)
        unique["input crystal's density"] = ax.lines[-1]
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper right")
    ax.set_xlabel("density (g/cm³)")
    ax.set_ylabel("lattice energy (kcal/mol per molecule)")
    energies = [c.info["energy"] for c in prediction.crystals]
    if energies:
        densities = [c.density for c in prediction.crystals] + ([truth["density"]] if truth else [])
        ax.set_ylim(min(energies) - 4, max(energies) + 15)
        ax.set_xlim(min(densities) - 0.35, max(densities) + 0.35)
    ax.set_title(f"{prediction.name}: {prediction.summary['candidates']} candidates, ranked minima in colour",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def score_against(crystals: list[RigidCrystal], truth: RigidCrystal) -> list[dict]:
    """OXtalign n_matched / RMSD₁₅ (n = 15, 1 Å per molecule) of each crystal against ``truth``, and the
    matched PM-center of their 17-molecule clusters (Å)."""
    import oxtalign

    from kflow.molecular.evaluation.matching import compute_packing_matching

    reference = oxtalign.from_ase(truth.to_ase())
    true_cluster = torch.as_tensor(truth.cluster(17)).reshape(-1, 3)
    index = torch.arange(17).repeat_interleave(len(truth.atomic_numbers))
    out = []
    for crystal in crystals:
        pm = compute_packing_matching(true_cluster, torch.as_tensor(crystal.cluster(17)).reshape(-1, 3), index,
                                      permutation_invariant=True)
        try:
            result = oxtalign.compare(oxtalign.from_ase(crystal.to_ase()), reference, n=15)
            found = {"n_matched": int(result.n_matched), "rmsd15": float(result.rmsd_n)}
        except ValueError:  # OXtalign cannot read this crystal's molecules: nothing matches
            found = {"n_matched": 0, "rmsd15": float("nan")}
        out.append({**found, "pm_center_matched": float(pm.pm_center[0])})
    return out


def _check_budget(candidates: Any, atoms: int, source: str) -> None:
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"candidates must be a positive integer, got {candidates!r}")
    if candidates > MAX_CANDIDATES:
        hours = candidates * SECONDS_PER_CANDIDATE / 3600
        raise ValueError(f"candidates={candidates} is above the limit of {MAX_CANDIDATES} (about {hours:.0f} CPU "
                         f"hours at {SECONDS_PER_CANDIDATE} s a candidate); split the search or lower it")
    if atoms > MAX_CRYSTAL_ATOMS:
        raise InputError(source, "too_large", f"{atoms} atoms per molecule; crystal search takes at most "
                                              f"{MAX_CRYSTAL_ATOMS}")


def predict_crystals(x, *, candidates: int = DEFAULT_CANDIDATES, seed: int = 0, space_groups=FREQUENT_SPACE_GROUPS,
                     keep: int = 10, smiles: bool | None = None, name: str | None = None, out=None,
                     progress: bool | Callable = True, settings: SearchSettings | None = None) -> CrystalPrediction:
    """Predict crystal structures of a rigid molecule, ranked by MMFF94 lattice energy.

    ``x``: anything ``kflow assemble`` reads (SMILES, XYZ/MOL/SDF, a crystal file whose molecule is used and which
    every prediction is scored against, RDKit/ASE/pymatgen objects). ``candidates``: the budget (split over
    ``space_groups`` by their share of the CSD; at most ``MAX_CANDIDATES``); ``seed``: the candidates drawn (a
    budget is a prefix of a larger one with the same seed); ``keep``: crystals returned; ``out``: a folder to
    write (``CrystalPrediction.write``); ``progress``: a bar on stderr (or a callable(group, done, total))."""
    from tqdm.auto import tqdm

    from kflow.molecular.physics.mmff import MoleculeForceField

    check_seed(seed)  # before any work (2**70 once failed deep in a generator)
    if out is not None:  # refused before any work: a foreign or unwritable folder, one another run writes
        check_out_folder(Path(out))
        with one_writer(out, "kflow crystal"):
            return predict_crystals(x, candidates=candidates, seed=seed, space_groups=space_groups, keep=keep,
                                    smiles=smiles, name=name, out=None, progress=progress,
                                    settings=settings).write_and_return(out)
    start = time.perf_counter()
    inp: AssemblyInput = read_assembly_input(x, smiles=smiles, seed=seed, name=name)
    _check_budget(candidates, len(inp.atomic_numbers), inp.source)
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2 ** 31):
        raise ValueError(f"seed must be an integer in [0, 2^31), got {seed!r}")
    base = settings or SearchSettings()
    settings = SearchSettings(**{**vars(base), "candidates": int(candidates), "seed": int(seed),
                                 "space_groups": tuple(space_groups), "keep": int(keep)})
    try:
        forcefield = MoleculeForceField.from_geometry(inp.atomic_numbers, inp.positions)
    except ValueError as err:
        raise InputError(inp.source, "no_force_field", str(err)) from err
    volume = estimate_volume_per_molecule(inp.atomic_numbers, inp.positions)
    bar = None
    if progress is True:
        bar = tqdm(total=settings.candidates, desc=f"crystal search {inp.name}", unit="candidate", leave=False)
        callback = lambda group, done, total: bar.update(done - bar.n)  # noqa: E731
    else:
        callback = progress or None
    try:
        found = search_crystals(forcefield, volume, settings, inp.name, progress=callback)
    finally:
        if bar is not None:
            bar.close()
    crystals = found["crystals"]
    truth, scores = None, []
    summary = {"input": inp.source, "name": inp.name, "formula": inp.formula, "kind": inp.kind,
               "atoms_per_molecule": int(len(inp.atomic_numbers)), "candidates": settings.candidates,
               "seed": settings.seed, "space_groups": allocate_budget(settings.candidates, settings.space_groups),
               "force_field": f"MMFF94 intermolecular (bonds by {forcefield.bonds}), rigid molecule, Ewald",
               "estimated_volume_per_molecule": volume, "notes": list(inp.notes)}
    if inp.kind == "crystal":
        truth = RigidCrystal.from_molecules(inp.name, inp.molecules)
        scores = score_against(crystals, truth)
        from kflow.molecular.crystal.relax import crystal_energy

        summary["input_crystal"] = {"density": truth.density, "z": truth.z,
                                    "energy": crystal_energy(forcefield, truth, **settings.fine)}
    summary["ranked"] = [{**{k: v for k, v in c.info.items() if isinstance(v, (int, float, str))},
                          **(scores[i] if scores else {})} for i, c in enumerate(crystals)]
    summary["seconds"] = time.perf_counter() - start
    summary["seconds_per_candidate"] = found["seconds"] / settings.candidates
    prediction = CrystalPrediction(inp.name, crystals, scores, summary, found["minima"])
    if out is not None:
        prediction.write(out)
    return prediction
