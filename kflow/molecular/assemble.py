"""Predict how one molecule packs: the library behind ``kflow assemble``.

Input (``read_assembly_input``) is one of
- a molecule: an XYZ, MOL or SDF file (one structure; RDKit for MOL/SDF, ASE otherwise) or a SMILES string (RDKit:
  hydrogens added, one ETKDG conformer embedded with the seed, MMFF-optimised, UFF where MMFF lacks parameters);
- a crystal: a CIF, an extxyz (or any ASE-readable file) with a periodic cell, or an ASE database row. A file with
  several structures needs ``PATH@N``: for an ASE database N is the row id (``crystals.db@3``), for other files
  the 0-based position of the structure (CIF data block, SDF record, extxyz frame).

A molecule alone gets 17 start copies with the ``hard`` preset logic (random orientations, centroids placed at
random without overlap at crystal density). The density comes from the molecule alone: its van der Waals volume
(union of Bondi spheres, on a 0.25 Å grid) divided by the packing coefficient 0.71, the median of the CSD-500
crystals (5–95 %: 0.69–0.76; Kitaigorodskii's organic crystals span 0.65–0.77). ``mirror="half"`` mirrors 8 of
the 17 copies (x → −x, then the random rotation) for a racemic mix; every copy keeps the input's atom order.
A crystal gets its true 17-molecule cluster and a start by the model's preset (``crystals.build_cluster``).

Prediction runs the model's sampler on all ``samples`` starts at once, each molecule is snapped onto the exact
rigid motion of its input geometry (float64 Kabsch; the sampler is rigid to float32 rounding, ~1e-6 Å, reported),
and the samples are ranked by a physical score: fewest close contacts (intermolecular atom pairs closer than
0.75 × the sum of Bondi radii, 0.5 × for an H on N/O/F paired with N/O/F, so hydrogen bonds are not contacts;
96 % of the CSD-500 crystal clusters have none), then compactness (radius of gyration of the molecule centroids).
With a crystal input the samples are also scored against the true cluster (PM-atom, PM-center, index-paired and
with molecules matched, RMSD₁₅, collision and separation rates).

Outputs (``write_assembly_outputs``) appear together or not at all: the folder is built beside ``out_dir`` and
swapped in when complete (``store.staged_folder``).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kflow.molecular.cluster import NUM_MOLECULES, Cluster, InvalidCrystal
from kflow.molecular.io import cluster_pdb_text
from kflow.molecular.pretrained import MIRROR_MODES

__all__ = ["AssemblyInput", "InputError", "assemble", "read_assembly_input", "check_input",
           "estimate_volume_per_molecule", "lone_molecule_starts", "crystal_starts", "predict_clusters",
           "contact_scores", "rank_samples", "truth_metrics", "write_assembly_outputs", "plot_clusters",
           "OUTPUT_FILES", "PACKING_COEFFICIENT", "CONTACT_FACTOR", "HBOND_CONTACT_FACTOR", "RIGID_TOLERANCE"]

PACKING_COEFFICIENT = 0.71  # van der Waals volume / crystal volume per molecule, median of CSD-500
CONTACT_FACTOR = 0.75  # close contact: distance < factor × (r_vdw,i + r_vdw,j)
HBOND_CONTACT_FACTOR = 0.5  # ... for H(on N/O/F)···N/O/F pairs, whose hydrogen bonds are far shorter
RIGID_TOLERANCE = 1e-4  # Å: every predicted molecule is a rigid motion of its input geometry to this
BOND_FACTOR = 1.2  # covalent-radius multiplier for bonds, as crystals.find_molecules
MIN_ATOM_DISTANCE = 0.5  # Å: closer atoms are a broken structure (duplicates, disorder)
# Atoms per molecule checked before any pairwise geometry (an N x N x 3 distance array of a 20,000-atom XYZ is
# 9 GB); far above any shipped model's max_atoms, which check_input applies after the model is loaded.
MAX_MOLECULE_ATOMS = 1000
MOLECULE_SUFFIXES = (".sdf", ".mol", ".mol2")  # read by RDKit; everything else by ASE or the CIF reader
CRYSTAL_SUFFIXES = (".cif",)
DATABASE_SUFFIXES = (".db",)
OUTPUT_FILES = ("pred.extxyz", "pred.pdb", "start.extxyz", "truth.extxyz", "samples.extxyz", "summary.json",
                "cluster.png")
_POLAR = (7, 8, 9)


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


# ------------------------------------------------------------------------------------------------------ reading
def _split_selector(text: str) -> tuple[Path, int | None]:
    """``PATH`` or ``PATH@N`` -> (path, N or None). An existing file whose name contains ``@`` is taken whole."""
    path = Path(text)
    if path.exists() or "@" not in text:
        return path, None
    base, _, selector = text.rpartition("@")
    try:
        return Path(base), int(selector)
    except ValueError:
        raise InputError(text, "unreadable", f"'@{selector}' is not a structure number (PATH@N)") from None


def _pick(items: list, selector: int | None, source: str, what: str, ids: Sequence | None = None):
    """The one structure of a file, or the one ``selector`` names."""
    ids = list(ids) if ids is not None else list(range(len(items)))
    if selector is None:
        if len(items) != 1:
            raise InputError(source, "several_structures", f"the file holds {len(items)} {what}s; choose one with "
                             f"{source}@N (N one of {ids[0]}..{ids[-1]})")
        return items[0]
    if selector not in ids:
        raise InputError(source, "no_structure", f"no {what} {selector} (the file holds {what}s "
                         f"{ids[0]}..{ids[-1]})")
    return items[ids.index(selector)]


def _is_periodic(atoms) -> bool:
    return bool(np.all(atoms.pbc)) and atoms.cell.rank == 3


def _from_atoms(atoms, name: str, source: str, reader: str) -> AssemblyInput:
    if _is_periodic(atoms):
        return _crystal_input(atoms, name, source, reader)
    return AssemblyInput("molecule", name, source, reader, np.asarray(atoms.numbers, dtype=np.int64),
                         np.asarray(atoms.positions, dtype=np.float64))


def _crystal_input(atoms, name: str, source: str, reader: str) -> AssemblyInput:
    from kflow.molecular.crystals import cell_problem, find_molecules

    bounds = cell_problem(atoms.cell.array, len(atoms))  # before the periodic neighbour search
    if bounds:
        raise InputError(source, "out_of_bounds", bounds)
    try:
        molecules = find_molecules(atoms, BOND_FACTOR)
    except InvalidCrystal as err:
        raise InputError(source, err.reason, _detail(err)) from None
    return AssemblyInput("crystal", name, source, reader, np.asarray(molecules.atomic_numbers, dtype=np.int64),
                         np.asarray(molecules.positions[0], dtype=np.float64), atoms=atoms, molecules=molecules)


def _detail(err: InvalidCrystal) -> str:
    return str(err).removeprefix(f"{err.reason}: ") or err.reason


def _read_rdkit(path: Path, selector: int | None, source: str) -> AssemblyInput:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # RDKit's own warnings would precede our one-line error
    suffix = path.suffix.lower()
    if suffix == ".sdf":
        mols = list(Chem.SDMolSupplier(str(path), removeHs=False, sanitize=True))
        if any(m is None for m in mols):  # retry unsanitised: geometry is all we need
            raw = list(Chem.SDMolSupplier(str(path), removeHs=False, sanitize=False))
            mols = [m if m is not None else r for m, r in zip(mols, raw)]
    else:
        reader = Chem.MolFromMol2File if suffix == ".mol2" else Chem.MolFromMolFile
        mol = reader(str(path), removeHs=False) or reader(str(path), removeHs=False, sanitize=False)
        mols = [mol]
    if not mols:
        raise InputError(source, "no_structure", "the file holds no molecule")
    mol = _pick(mols, selector, source, "molecule")
    if mol is None or mol.GetNumAtoms() == 0:
        raise InputError(source, "unreadable", f"RDKit cannot parse the {suffix.lstrip('.').upper()} record")
    if mol.GetNumConformers() == 0:
        raise InputError(source, "no_coordinates", "the molecule has no coordinates")
    notes = []
    if not mol.GetConformer().Is3D():
        raise InputError(source, "no_coordinates", "the coordinates are 2-D (a drawing); give a 3-D structure or "
                         "use --smiles")
    implicit = sum(a.GetNumImplicitHs() for a in mol.GetAtoms()) if _sanitized(mol) else 0
    if implicit:
        mol = Chem.AddHs(mol, addCoords=True)
        notes.append(f"added {implicit} implicit hydrogens (RDKit, coordinates from the geometry)")
    name = (mol.GetProp("_Name").strip() if mol.HasProp("_Name") else "") or path.stem
    inp = AssemblyInput("molecule", name, source, "rdkit",
                        np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64),
                        np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64), notes=notes)
    return inp


def _sanitized(mol) -> bool:
    try:
        mol.GetAtomWithIdx(0).GetNumImplicitHs()
        return True
    except RuntimeError:  # an unsanitised molecule has no implicit-H counts
        return False


def _read_database(path: Path, selector: int | None, source: str) -> AssemblyInput:
    import ase.db

    from kflow.molecular.crystals import _row_name

    try:
        rows = list(ase.db.connect(str(path)).select())
    except Exception as err:
        raise InputError(source, "unreadable", f"not an ASE database ({type(err).__name__}: {err})") from None
    if not rows:
        raise InputError(source, "no_structure", "the database holds no rows")
    row = _pick(rows, selector, source, "row", [r.id for r in rows])
    name = _row_name(row) or f"{path.stem}_{row.id}"
    return _from_atoms(row.toatoms(), name, f"{path}@{row.id}", "ase.db")


def _read_cif(path: Path, selector: int | None, source: str) -> AssemblyInput:
    from kflow.molecular.crystals import read_cif

    problems = []
    crystals = list(read_cif(path, problems))
    if not crystals:
        problem = problems[0] if problems else None
        raise InputError(source, problem.reason if problem else "no_structure",
                         problem.message if problem else "no crystal structure in the file")
    name, atoms = _pick(crystals, selector, source, "data block")
    return _crystal_input(atoms, name, source, f"cif ({atoms.info.get('reader', 'ase')})")


def _read_ase(path: Path, selector: int | None, source: str) -> AssemblyInput:
    import ase.io

    fmt = "extxyz" if path.suffix.lower() in (".xyz", ".extxyz") else None
    try:
        frames = ase.io.read(str(path), index=":", format=fmt)
    except Exception as err:
        raise InputError(source, "unreadable", f"cannot be read as {fmt or 'a structure file'} "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    if not frames:
        raise InputError(source, "no_structure", "the file holds no structure")
    atoms = _pick(frames, selector, source, "frame")
    name = str(atoms.info.get("NAME") or atoms.info.get("name") or path.stem)
    return _from_atoms(atoms, name, source, "ase")


def molecule_from_smiles(smiles: str, seed: int = 0) -> AssemblyInput:
    """A molecule from SMILES: RDKit adds hydrogens, embeds one conformer (ETKDGv3, ``seed``) and optimises it
    with MMFF94 (UFF where MMFF has no parameters). Refuses mixtures (``.``) and polymer repeat units (``*``)."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem

    RDLogger.DisableLog("rdApp.*")
    source = f"SMILES {smiles!r}"
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise InputError(source, "unreadable", "RDKit cannot parse the SMILES")
    dummies = sum(a.GetAtomicNum() == 0 for a in mol.GetAtoms())
    if dummies:
        raise InputError(source, "polymeric", f"{dummies} attachment point(s) '*': a repeat unit or fragment, not a "
                         "whole molecule")
    fragments = Chem.GetMolFrags(mol, asMols=True)
    if len(fragments) > 1:
        raise InputError(source, "multi_component", f"{len(fragments)} fragments "
                         f"({', '.join(Chem.MolToSmiles(f) for f in fragments)}): kflow assemble packs one kind of "
                         "molecule (a salt, solvate or mixture needs all of its components, which it cannot model)")
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed) % (2 ** 31)
    if AllChem.EmbedMolecule(mol, params) != 0:
        params.useRandomCoords = True
        if AllChem.EmbedMolecule(mol, params) != 0:
            raise InputError(source, "no_coordinates", "RDKit could not embed a 3-D conformer")
    notes = [f"conformer: RDKit ETKDGv3 (seed {params.randomSeed})"]
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
        notes.append("optimised with MMFF94")
    elif AllChem.UFFHasAllMoleculeParams(mol):
        AllChem.UFFOptimizeMolecule(mol, maxIters=2000)
        notes.append("optimised with UFF (MMFF has no parameters for it)")
    else:
        notes.append("not optimised (no MMFF or UFF parameters)")
    return AssemblyInput("molecule", "smiles", source, "rdkit (SMILES)",
                         np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64),
                         np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64), smiles=smiles, notes=notes)


def read_assembly_input(source: str, smiles: bool = False, seed: int = 0) -> AssemblyInput:
    """A molecule or crystal from a file (``PATH`` or ``PATH@N``, see the module docstring) or, with ``smiles``,
    a SMILES string. Raises ``InputError`` (one line naming the input and the reason) for anything unusable:
    unreadable files, salts and mixtures, polymeric networks, linear or tiny molecules, overlapping atoms."""
    if smiles:
        inp = molecule_from_smiles(source, seed)
    else:
        path, selector = _split_selector(str(source))
        label = str(source) if selector is None else str(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        if path.is_dir():
            raise InputError(label, "unreadable", "a folder; give one molecule or crystal file")
        suffix = path.suffix.lower()
        try:
            if suffix in MOLECULE_SUFFIXES:
                inp = _read_rdkit(path, selector, label)
            elif suffix in CRYSTAL_SUFFIXES:
                inp = _read_cif(path, selector, label)
            elif suffix in DATABASE_SUFFIXES:
                inp = _read_database(path, selector, label)
            else:
                inp = _read_ase(path, selector, label)
        except (InputError, FileNotFoundError):
            raise
        except Exception as err:  # a reader failing on a malformed file is the file's problem, said in one line
            raise InputError(label, "unreadable", f"{type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else 'no detail'}") from None
    _check_geometry(inp)
    return inp


def _bonds(z: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Covalent bonds [E, 2] (i < j) of one molecule: d < 1.2 × (r_cov,i + r_cov,j)."""
    from ase.data import covalent_radii

    radii = covalent_radii[z] * BOND_FACTOR
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    return np.argwhere(np.triu(d < radii[:, None] + radii[None], 1))


def _check_geometry(inp: AssemblyInput) -> None:
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
    bonds = _bonds(z, pos)
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


# ------------------------------------------------------------------------------------------------------- starts
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


def _mirrored(mirror: str, m: int = NUM_MOLECULES) -> np.ndarray:
    """Which of the m copies are mirror images: none, or every second one after the central copy (8 of 17)."""
    if mirror not in MIRROR_MODES:
        raise ValueError(f"mirror must be one of {MIRROR_MODES}, got {mirror!r}")
    return (np.arange(m) % 2 == 1) if mirror == "half" else np.zeros(m, dtype=bool)


def _reference_copies(inp: AssemblyInput, mirror: str) -> np.ndarray:
    """[M, P, 3] float64: the centred input geometry per copy, x -> −x for the mirrored ones."""
    centred = inp.positions - inp.positions.mean(0)
    copies = np.repeat(centred[None], NUM_MOLECULES, 0)
    copies[_mirrored(mirror), :, 0] *= -1
    return copies


def lone_molecule_starts(inp: AssemblyInput, samples: int, seed: int = 0, mirror: str = "none",
                         volume_per_molecule: float | None = None) -> list[Cluster]:
    """``samples`` start clusters of 17 copies of a lone molecule, the ``hard`` preset (``NOISE_PRESETS``) with
    seeds ``seed``·1000003 + k. There is no true cluster: ``final_positions`` repeat the start."""
    from kflow.molecular.crystals import NOISE_PRESETS

    volume = volume_per_molecule or estimate_volume_per_molecule(inp.atomic_numbers, inp.positions)
    copies = torch.from_numpy(_reference_copies(inp, mirror))  # [M, P, 3]
    m, p, _ = copies.shape
    z = torch.from_numpy(np.tile(inp.atomic_numbers, m))
    mol = torch.arange(m).repeat_interleave(p)
    out = []
    for k in range(samples):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
        start = NOISE_PRESETS["hard"].apply(copies, gen, volume).reshape(-1, 3)
        start = start - start.mean(0)
        cluster = Cluster(z, mol, start, start, f"{inp.name}_sample{k}", inp.name)
        cluster.info.update(sample=k, start_seed=int(seed) * 1_000_003 + k)
        out.append(cluster.validate())
    return out


def crystal_starts(inp: AssemblyInput, samples: int, seed: int = 0, preset: str = "hard") -> list[Cluster]:
    """``samples`` clusters of a crystal input: the true 17-molecule cluster with starts drawn by ``preset``
    (``build_cluster`` draws 0..samples−1 with ``seed``)."""
    from kflow.molecular.crystals import build_cluster

    try:
        return [build_cluster(inp.atoms, seed=seed, name=inp.name, noise=preset, molecules=inp.molecules, draw=k)
                for k in range(samples)]
    except InvalidCrystal as err:
        raise InputError(inp.source, err.reason, _detail(err)) from None


# --------------------------------------------------------------------------------------------------- prediction
class _CountingModel(torch.nn.Module):
    """The flow model with a progress bar that advances at every network evaluation."""

    def __init__(self, model, bar):
        super().__init__()
        self.model, self.bar = model, bar

    def preprocess(self, batch):
        return self.model.preprocess(batch)

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.bar.update(1)
        return out


def _molecules(x: torch.Tensor, clusters: Sequence[Cluster]) -> torch.Tensor:
    """[S, N, 3] (atoms in molecule order, every molecule P atoms) -> [S, M, P, 3]."""
    m = clusters[0].num_molecules
    return x.reshape(x.shape[0], m, -1, 3)


def predict_clusters(model, rigid, clusters: Sequence[Cluster], references: torch.Tensor, steps: int = 10,
                     seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, float]:
    """Sample every cluster (one batch), then place each molecule's reference geometry (``references`` [S, M, P,
    3], float64) by the best rigid motion onto the sampled atoms. Returns (positions [S, N, 3] float64, largest RMS
    distance between a sampled molecule and its rigid placement, Å)."""
    from tqdm.auto import tqdm

    from kflow.molecular.geometry import atoms_from_poses, kabsch
    from kflow.molecular.sampling import predict_assembly

    nfe = 1 if rigid.regression else steps
    with tqdm(total=nfe, desc=f"sampling {len(clusters)} cluster(s)", unit="step", disable=not progress,
              leave=False) as bar:
        preds = predict_assembly(_CountingModel(model, bar), rigid, [c.to_data() for c in clusters], steps=steps,
                                 batch_size=len(clusters), seed=seed)
    sampled = _molecules(torch.stack([p[0] for p in preds]).double(), clusters)  # [S, M, P, 3]
    rot, shift = kabsch(references, sampled)
    placed = atoms_from_poses(shift, rot, references)
    residual = (placed - sampled).square().sum(-1).mean(-1).sqrt().max().item()
    return placed.reshape(len(clusters), -1, 3), residual


# ------------------------------------------------------------------------------------------------------ scoring
def contact_scores(positions: torch.Tensor, cluster: Cluster) -> dict:
    """Physical plausibility of one cluster's positions [N, 3] without a reference: close contacts (pairs of atoms
    in different molecules closer than ``CONTACT_FACTOR`` × the sum of Bondi radii, ``HBOND_CONTACT_FACTOR`` × for
    polar-H···N/O/F), the radius of gyration of the molecule centroids (Å; compactness), and the collision and
    separation rates of ``metrics`` (%)."""
    from ase.data import vdw_radii

    from kflow.molecular.geometry import index_centroids
    from kflow.molecular.metrics import collision_rate, separation_rate

    x = positions.double()
    z, mol = cluster.atomic_numbers, cluster.molecule_index
    radii = torch.from_numpy(np.nan_to_num(vdw_radii, nan=2.0))[z]
    bonded_h = _polar_hydrogens(x, z, mol)
    acceptor = torch.isin(z, torch.tensor(_POLAR))
    hbond = (bonded_h[:, None] & acceptor[None]) | (acceptor[:, None] & bonded_h[None])
    factor = torch.where(hbond, HBOND_CONTACT_FACTOR, CONTACT_FACTOR)
    inter = mol[:, None] != mol[None]
    close = (torch.cdist(x, x) < factor * (radii[:, None] + radii[None])) & inter
    centroids = index_centroids(x, mol, cluster.num_molecules)
    rg = (centroids - centroids.mean(0)).square().sum(-1).mean().sqrt().item()
    return {"close_contacts": int(close.sum().item() // 2), "radius_of_gyration": rg,
            "collision_pct": float(collision_rate(x, mol, z)[0]),
            "separation_pct": float(separation_rate(x, mol, z)[0])}


def _polar_hydrogens(x: torch.Tensor, z: torch.Tensor, mol: torch.Tensor) -> torch.Tensor:
    """[N] bool: hydrogens bonded (within their own molecule) to N, O or F."""
    from ase.data import covalent_radii

    cov = torch.from_numpy(covalent_radii)[z] * BOND_FACTOR
    bonded = (torch.cdist(x, x) < cov[:, None] + cov[None]) & (mol[:, None] == mol[None])
    polar = torch.isin(z, torch.tensor(_POLAR))
    return (z == 1) & (bonded & polar[None]).any(1)


def rank_samples(scores: Sequence[dict]) -> list[int]:
    """Sample indices, best first: fewest close contacts, then the most compact (smallest centroid radius of
    gyration), then the lower index."""
    return sorted(range(len(scores)), key=lambda k: (scores[k]["close_contacts"], scores[k]["radius_of_gyration"], k))


def truth_metrics(cluster: Cluster, positions: torch.Tensor) -> dict:
    """Scores of predicted positions [N, 3] against the cluster's true (crystal) arrangement: PM-atom and PM-center
    (Å; molecules paired by index, and ``_matched``: after matching predicted to true molecules), RMSD₁₅ (Å),
    collision and separation rates (%)."""
    from kflow.molecular.metrics import collision_rate, compute_packing_matching, rmsd15, separation_rate

    true, pred = cluster.final_positions.double(), positions.double()
    z, mol = cluster.atomic_numbers, cluster.molecule_index
    paired = compute_packing_matching(true, pred, mol)
    matched = compute_packing_matching(true, pred, mol, permutation_invariant=True)
    return {"pm_atom": float(paired.pm_atom[0]), "pm_center": float(paired.pm_center[0]),
            "pm_atom_matched": float(matched.pm_atom[0]), "pm_center_matched": float(matched.pm_center[0]),
            "rmsd15": float(rmsd15(true, pred, mol, z)[0]), "collision_pct": float(collision_rate(pred, mol, z)[0]),
            "separation_pct": float(separation_rate(pred, mol, z)[0])}


# ------------------------------------------------------------------------------------------------------ outputs
def _check_out_dir(out_dir: Path) -> None:
    """The output folder is replaced as a whole: refuse one that holds anything ``kflow assemble`` did not write
    (hidden files too: ``--out my_repo/`` must never sweep away ``my_repo/.git``), the current folder, a file and
    a place that is not writable."""
    from kflow.utils.io import check_replaceable_folder

    check_replaceable_folder(out_dir, dict.fromkeys(OUTPUT_FILES), "kflow assemble")


def _atoms(cluster: Cluster, positions: torch.Tensor, **info):
    import ase

    atoms = ase.Atoms(numbers=cluster.atomic_numbers.numpy(), positions=positions.double().numpy())
    atoms.set_array("mol_idx", cluster.molecule_index.numpy().astype(np.int64))
    atoms.info.update({k: v for k, v in info.items() if v is not None})
    return atoms


def plot_clusters(panels: Sequence[tuple[str, torch.Tensor]], cluster: Cluster, path: str | os.PathLike,
                  title: str = "") -> Path:
    """3-D views side by side, one colour per molecule, bonds drawn: ``panels`` = [(title, positions [N, 3])].
    Every panel is centred on its molecule centroids and turned to their principal axes, so the clusters are
    compared in the same orientation convention; axis limits are shared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Line3DCollection

    from kflow.molecular.geometry import index_centroids

    z, mol = cluster.atomic_numbers, cluster.molecule_index
    m = cluster.num_molecules
    p = cluster.num_atoms // m
    bonds = _bonds(z[:p].numpy(), cluster.initial_positions[:p].double().numpy())  # same atom order in every copy
    colours = plt.get_cmap("tab20")(np.arange(m) % 20)
    views = []
    for _, x in panels:
        x = x.double()
        centroids = index_centroids(x, mol, m)
        centre = centroids.mean(0)
        _, axes = torch.linalg.eigh(((centroids - centre).T @ (centroids - centre)))
        views.append(((x - centre) @ axes.flip(-1)).numpy())  # largest spread first
    limit = max(np.abs(v).max() for v in views)
    fig = plt.figure(figsize=(4.4 * len(panels), 4.6))
    for k, ((label, _), view) in enumerate(zip(panels, views)):
        ax = fig.add_subplot(1, len(panels), k + 1, projection="3d")
        heavy = z.numpy() > 1
        ax.scatter(*view.T, c=colours[mol.numpy()], s=np.where(heavy, 14, 4), depthshade=False, linewidths=0)
        segments = view.reshape(m, p, 3)[:, bonds]  # [M, E, 2, 3]
        ax.add_collection3d(Line3DCollection(segments.reshape(-1, 2, 3), colors=np.repeat(colours, len(bonds), 0),
                                             linewidths=1.0))
        for set_lim in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
            set_lim(-limit, limit)
        ax.set_box_aspect((1, 1, 1))
        ax.set_title(label, fontsize=9)
        for set_ticks in (ax.set_xticks, ax.set_yticks, ax.set_zticks):
            set_ticks([])
    fig.tight_layout(rect=(0, 0, 1, 0.93) if title else None)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def write_assembly_outputs(out_dir: str | os.PathLike, clusters: Sequence[Cluster], positions: torch.Tensor,
                           order: Sequence[int], summary: dict, truth: bool) -> list[str]:
    """Write pred.extxyz, pred.pdb, start.extxyz, samples.extxyz (several samples), truth.extxyz (``truth``),
    cluster.png and summary.json for the samples (``positions`` [S, N, 3], ranked by ``order``) into a staging
    folder beside ``out_dir`` and swap it in when complete: ``out_dir`` shows all files or none."""
    import ase.io

    from kflow.molecular.store import staged_folder

    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    best = order[0]
    chosen = clusters[best]
    # a name read from a file (an ASE db row may hold a newline) must not break the extxyz comment line
    name = " ".join("".join(c if c.isprintable() else " " for c in chosen.crystal).replace('"', "'").split())
    files = ["pred.extxyz", "pred.pdb", "start.extxyz"] + (["samples.extxyz"] if len(clusters) > 1 else []) + (
        ["truth.extxyz"] if truth else []) + ["cluster.png", "summary.json"]
    summary = {**summary, "files": files}
    with staged_folder(out_dir) as stage:
        stage.mkdir()
        ase.io.write(stage / "pred.extxyz", _atoms(chosen, positions[best], name=name, arrangement="predicted",
                                                   sample=best), format="extxyz")
        (stage / "pred.pdb").write_text(cluster_pdb_text(chosen, positions[best], f"kflow assemble: {name}, predicted "
                                                  f"cluster (sample {best})"))
        ase.io.write(stage / "start.extxyz", _atoms(chosen, chosen.initial_positions, name=name, arrangement="start",
                                                    sample=best), format="extxyz")
        if len(clusters) > 1:
            ase.io.write(stage / "samples.extxyz", [_atoms(clusters[k], positions[k], name=name,
                                                           arrangement="predicted", sample=k, rank=r)
                                                    for r, k in enumerate(order)], format="extxyz")
        panels = [("start", chosen.initial_positions), (f"prediction (sample {best})", positions[best])]
        if truth:
            ase.io.write(stage / "truth.extxyz", _atoms(chosen, chosen.final_positions, name=name,
                                                        arrangement="crystal"), format="extxyz")
            panels.append(("crystal", chosen.final_positions))
        metrics = summary.get("metrics")
        subtitle = f"{name}: {chosen.num_molecules} molecules"
        if metrics:
            subtitle += (f"; PM-center {metrics['pm_center_matched']:.2f} Å (matched), RMSD15 "
                         f"{metrics['rmsd15']:.2f} Å")
        plot_clusters(panels, chosen, stage / "cluster.png", subtitle)
        (stage / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return files


# ----------------------------------------------------------------------------------------------------- pipeline
class _Phases:
    """One progress line over the steps of ``assemble`` (each may take a second or more: the first imports, the
    conformer, the model, sampling, plotting) and their wall times."""

    NAMES = ("reading input", "loading model", "building starts", "sampling", "scoring", "writing")

    def __init__(self, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(self.NAMES), bar_format="{desc} [{n_fmt}/{total_fmt}, {elapsed}]",
                        disable=not enabled, leave=False)
        self.timings: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.bar.set_description_str(f"kflow assemble: {name}")
        t0 = time.perf_counter()
        yield
        self.timings[name.replace(" ", "_") + "_s"] = round(time.perf_counter() - t0, 3)
        self.bar.update(1)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    def close(self):
        self.bar.close()


def assemble(source: str, out_dir: str | os.PathLike, model: str = "hard", smiles: bool = False,
             samples: int = 1, steps: int | None = None, seed: int = 0, mirror: str | None = None,
             progress: bool = True, log=None) -> dict:
    """Predict the 17-molecule packing of a molecule (file or SMILES) or a crystal and write the outputs to
    ``out_dir`` (see the module docstring); returns the summary (also ``out_dir/summary.json``).

    ``model``: a shipped name (``pretrained.list_pretrained()``) or a pretrained file. ``samples`` starts drawn with
    ``seed`` are sampled in ``steps`` band steps (default: the model's ``sample_steps``) and ranked by
    ``contact_scores``; ``mirror`` ("none" | "half", default: the model's) applies to lone molecules.
    Every failure (bad input, missing model) raises before anything is written."""
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if mirror is not None and mirror not in MIRROR_MODES:
        raise ValueError(f"--mirror must be one of {MIRROR_MODES}, got {mirror!r}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    phase = _Phases(progress)
    try:
        summary = _assemble(source, out_dir, model, smiles, samples, steps, seed, mirror, progress, phase)
    finally:
        phase.close()
    if log is not None:
        for line in summary["input"]["notes"]:
            log(f"note: {line}")
    return {**summary, "total_s": phase.elapsed()}


def _assemble(source, out_dir: Path, model, smiles, samples, steps, seed, mirror, progress, phase: _Phases) -> dict:
    from kflow.molecular.pretrained import load_pretrained, resolve_pretrained

    with phase("reading input"):
        inp = read_assembly_input(source, smiles=smiles, seed=seed)
    with phase("loading model"):
        model_path = resolve_pretrained(model)
        net, rigid, meta = load_pretrained(model_path)
        check_input(inp, meta, f"model {model!r}")
    notes = list(inp.notes)
    mirror_mode = mirror or meta["mirror"]
    with phase("building starts"):
        if inp.kind == "molecule":
            volume = estimate_volume_per_molecule(inp.atomic_numbers, inp.positions)
            clusters = lone_molecule_starts(inp, samples, seed, mirror_mode, volume)
            references = torch.from_numpy(_reference_copies(inp, mirror_mode))[None].expand(samples, -1, -1, -1)
            start = {"preset": "hard", "mirror": mirror_mode, "mirrored_copies": int(_mirrored(mirror_mode).sum()),
                     "volume_per_molecule": volume,
                     "volume_source": f"van der Waals volume / packing coefficient {PACKING_COEFFICIENT}"}
            if meta["preset"] != "hard":
                notes.append(f"model {model!r} was trained on {meta['preset']!r} starts (each molecule near its "
                             "target); a lone molecule gets a 'hard' start, which it was not trained for")
        else:
            clusters = crystal_starts(inp, samples, seed, meta["preset"])
            references = torch.stack([_molecules(c.final_positions.double()[None], clusters)[0] for c in clusters])
            cell_volume = abs(float(np.linalg.det(inp.molecules.cell))) / len(inp.molecules.positions)
            start = {"preset": meta["preset"], "mirror": "as in the crystal", "volume_per_molecule": cell_volume,
                     "volume_source": "crystal cell"}
            if mirror is not None:
                notes.append("--mirror applies to lone molecules; a crystal's copies keep their own handedness")
    steps = steps or int(meta.get("sample_steps", 10))
    with phase("sampling"):
        positions, sampler_residual = predict_clusters(net, rigid, clusters, references.contiguous(), steps, seed,
                                                       progress)
    truth = inp.kind == "crystal"
    with phase("scoring"):
        _check_rigid(positions, references, clusters, sampler_residual)
        scores = [contact_scores(positions[k], clusters[k]) for k in range(samples)]
        order = rank_samples(scores)
        sample_rows = []
        for k, score in enumerate(scores):
            row = {"sample": k, "rank": order.index(k) + 1, "start_seed": clusters[k].info.get("start_seed"),
                   "draw": k if truth else None, **score}
            if truth:
                row["metrics"] = truth_metrics(clusters[k], positions[k])
            sample_rows.append({key: v for key, v in row.items() if v is not None})
        start_metrics = truth_metrics(clusters[order[0]], clusters[order[0]].initial_positions) if truth else None
    best = order[0]
    summary = {
        "input": {"kind": inp.kind, "source": inp.source, "name": inp.name, "reader": inp.reader,
                  "formula": inp.formula, "atoms_per_molecule": len(inp.atomic_numbers),
                  **({"smiles": inp.smiles} if inp.smiles else {}), "notes": notes},
        "model": {"name": str(model), "path": str(model_path), "preset": meta["preset"],
                  "trained_mirror": meta["mirror"], "test_metrics": meta.get("test_metrics"),
                  "created": meta.get("created")},
        "seed": seed, "steps": steps, "method": "band", "num_samples": samples, "start": start,
        "ranking": f"fewest close contacts (< {CONTACT_FACTOR} x sum of Bondi radii, {HBOND_CONTACT_FACTOR} x for "
                   "hydrogen-bond pairs), then smallest radius of gyration of the molecule centroids",
        "chosen_sample": best,
        "samples": sample_rows,
        "rigidity": {"tolerance_A": RIGID_TOLERANCE, "sampler_residual_A": sampler_residual,
                     "note": "each written molecule is its input geometry moved rigidly (float64 Kabsch onto the "
                             "sampled atoms); sampler_residual_A is how far the sampled atoms were from that"},
    }
    if truth:
        summary["metrics"] = sample_rows[best]["metrics"]
        summary["start_metrics"] = start_metrics
    # summary.json is written with the outputs, so it holds the times up to writing
    summary["timings"] = {**phase.timings, "total_before_writing_s": phase.elapsed()}
    with phase("writing"):
        files = write_assembly_outputs(out_dir, clusters, positions, order, summary, truth)
    return {**summary, "files": files}


def _check_rigid(positions: torch.Tensor, references: torch.Tensor, clusters: Sequence[Cluster],
                 sampler_residual: float) -> None:
    """Every molecule must be a proper rigid motion of its reference; a violation is a bug, not a user error."""
    from kflow.molecular.geometry import rigid_residuals

    residual = rigid_residuals(references, _molecules(positions, clusters)).max().item()
    if residual > RIGID_TOLERANCE or sampler_residual > 1e-2:
        raise RuntimeError(f"predicted molecules are not rigid copies of the input (residual {residual:.3g} Å, "
                           f"sampler {sampler_residual:.3g} Å)")
