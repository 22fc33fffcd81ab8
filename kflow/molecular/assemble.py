"""Predict how one molecule packs: the library behind ``kflow assemble``.

Python (objects in, objects out)::

    from kflow.molecular.assemble import assemble

    result = assemble("CC(=O)Oc1ccccc1C(=O)O")     # or an RDKit Mol, an ASE Atoms, a pymatgen Structure, a path
    best = result.predictions[0]                    # ase.Atoms, 17 molecules (array "mol_idx"), best first
    result.scores[0], result.metrics                # contact scores / ranking; metrics against a known crystal
    result.write("runs/aspirin")                    # the files of ``kflow assemble --out runs/aspirin``

Input (``read_assembly_input``) is one of
- a molecule: an RDKit ``Mol`` (its first 3-D conformer; one is embedded as for SMILES when it has none), an ASE
  ``Atoms`` without periodicity, a pymatgen ``Molecule``, an XYZ, MOL or SDF file (one structure; RDKit for
  MOL/SDF, ASE otherwise) or a SMILES string (RDKit: hydrogens added, one ETKDG conformer embedded with the seed,
  MMFF-optimised, UFF where MMFF lacks parameters);
- a crystal: an ASE ``Atoms`` periodic along all three axes (a cell and ``pbc=True``), a pymatgen ``Structure``,
  a CIF, an extxyz (or any ASE-readable file) with a periodic cell, or an ASE database row (``.db``, ``.json``). A
  file with several structures needs ``PATH@N``: N is the 0-based position of the structure in the file, the same
  for every format (CIF data block, SDF record, extxyz frame, database row; as ``ase.io.read("PATH@N")`` counts);
  ``PATH@id=K`` picks an ASE database row by its id. The structure's ``source`` is ``PATH@N`` as given.
A string is a path when that file exists (``PATH@N``: when PATH exists), else SMILES when RDKit parses it, else a
missing file; ``smiles=True`` always reads SMILES, ``smiles=False`` never.

Names: the structure's own name wherever one is shown (titles, extxyz ``name``, PDB title, summary): an RDKit
``_Name``, an ASE ``info`` / pymatgen ``properties`` key ``name``, ``refcode``, ``csd_code``, ``identifier`` or
``title`` (any case), a CIF data block, an ASE database row's refcode, an SDF title; else the molecule's formula
(a SMILES string, an unnamed object) or the file name. ``name=`` overrides it.

A molecule alone gets 17 start copies with the ``hard`` preset logic (random orientations, centroids placed at
random without overlap at crystal density). The density comes from the molecule alone: its van der Waals volume
(union of Bondi spheres, on a 0.25 Å grid) divided by the packing coefficient 0.71, the median of the CSD-500
crystals (5–95 %: 0.69–0.76; Kitaigorodskii's organic crystals span 0.65–0.77). ``mirror="half"`` mirrors 8 of
the 17 copies (x → −x, then the random rotation) for a racemic mix; every copy keeps the input's atom order.
With ``mirror="half"`` the notes say what the mirrored copies are (``mirror_note``): RDKit perceives the molecule
from its 3-D geometry (bond orders, else connectivity) and compares the isomeric SMILES of the input and of its
mirror image; when they differ the molecule is chiral and the 8 copies are its enantiomer (a racemic cluster, which
an enantiopure compound does not form: use ``mirror="none"``), else they are the same compound. Axial and planar
chirality (atropisomers) are not perceived.
A crystal gets its true 17-molecule cluster and a start by the model's preset (``crystals.build_cluster``).

Prediction runs the model's sampler on all ``samples`` starts at once, each molecule is snapped onto the exact
rigid motion of its input geometry (float64 Kabsch; the sampler is rigid to float32 rounding, ~1e-6 Å, reported),
and the samples are ranked by a physical score: fewest close contacts (intermolecular atom pairs closer than
0.75 × the sum of Bondi radii, 0.5 × for an H on N/O/F paired with N/O/F, so hydrogen bonds are not contacts;
96 % of the CSD-500 crystal clusters have none), then compactness (radius of gyration of the molecule centroids).
With a crystal input the samples are also scored against the true cluster (PM-atom, PM-center, index-paired and
with molecules matched, RMSD₁₅, collision and separation rates).

Outputs (``AssemblyResult.write``, ``write_assembly_outputs``) appear together or not at all: the folder is built
beside the output folder and swapped in when complete (``store.staged_folder``).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import numpy as np
import torch

from kflow.molecular.cluster import NUM_MOLECULES, Cluster, InvalidCrystal
from kflow.molecular.io import cluster_pdb_text
from kflow.molecular.pretrained import MIRROR_MODES
from kflow.utils.io import printable_name

if TYPE_CHECKING:
    from ase import Atoms

__all__ = ["AssemblyInput", "AssemblyModel", "AssemblyResult", "InputError", "assemble", "read_assembly_input",
           "molecule_from_smiles", "check_input", "mirror_note", "estimate_volume_per_molecule",
           "lone_molecule_starts", "crystal_starts", "predict_clusters", "contact_scores", "rank_samples",
           "truth_metrics", "write_assembly_outputs", "plot_clusters", "clear_model_cache", "OUTPUT_FILES",
           "DEFAULT_SAMPLES", "DEFAULT_MODEL", "PACKING_COEFFICIENT", "CONTACT_FACTOR", "HBOND_CONTACT_FACTOR",
           "RIGID_TOLERANCE"]

DEFAULT_SAMPLES = 8  # starts sampled and ranked, in Python (assemble) and on the command line (kflow assemble)
DEFAULT_MODEL = "hard"  # the shipped model for a molecule alone

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
DATABASE_SUFFIXES = (".db", ".json")  # ASE databases (ase.db): SQLite or JSON, read alike
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
def _split_selector(text: str) -> tuple[Path, "int | tuple[str, int] | None"]:
    """``PATH``, ``PATH@N`` or ``PATH@id=K`` -> (path, N, ``("id", K)`` or None). ``N`` is the 0-based position of
    the structure in the file, for every format (as ``ase.io.read("PATH@N")`` counts); ``id=K`` names an ASE
    database row by its id. An existing file whose name contains ``@`` is taken whole."""
    path = Path(text)
    if path.exists() or "@" not in text:
        return path, None
    base, _, selector = text.rpartition("@")
    key, is_id, value = selector.partition("=")
    try:
        number = int(value if is_id else selector)
        if is_id and key.strip() != "id" or number < 0:
            raise ValueError
    except ValueError:
        raise InputError(text, "unreadable", f"'@{selector}' is not a structure number (PATH@N, N counted from 0) "
                         "nor a database row id (PATH@id=K)") from None
    return Path(base), ("id", number) if is_id else number


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = [f"{k} {printable_name(n)}" for k, n in enumerate(names[:limit])]
    return ", ".join(shown) + (f", ... {len(names) - 1} {printable_name(names[-1])}" if len(names) > limit else "")


def _pick(items: list, selector, source: str, what: str, names: Sequence[str] | None = None):
    """The one structure of a file, or the one ``selector`` names: its 0-based position in the file (``PATH@N``
    means the same for every multi-structure format). ``names``: the structures' own names, shown when the choice
    is missing or wrong, so the number can be checked against the name."""
    listing = f": {_listing(names)}" if names else ""
    if isinstance(selector, tuple):
        raise InputError(source, "no_structure", f"@id= selects a row of an ASE database by its id; the {what}s of "
                         f"this file are chosen by position, {source}@N (N one of 0..{len(items) - 1}{listing})")
    if selector is None:
        if len(items) != 1:
            raise InputError(source, "several_structures", f"the file holds {len(items)} {what}s; choose one with "
                             f"{source}@N (N one of 0..{len(items) - 1}{listing})")
        return items[0]
    if selector >= len(items):
        raise InputError(source, "no_structure", f"no {what} {selector} (the file holds {len(items)} {what}"
                         f"{'s' if len(items) != 1 else ''}: 0..{len(items) - 1}{listing})")
    return items[selector]


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


_NAME_KEYS = ("name", "refcode", "csd_code", "identifier", "title")  # a structure's own name, in this order


def _own_name(properties: Mapping | None) -> str | None:
    """A structure's own name in a dictionary of properties (ASE ``info``, pymatgen ``properties``): the first
    non-empty value under ``_NAME_KEYS`` (any letter case, e.g. extxyz ``NAME``), also inside a nested
    ``key_value_pairs`` or ``data`` dictionary (``ase.db`` rows: ``row.toatoms(add_additional_information=True)``)."""
    if not isinstance(properties, Mapping):
        return None
    for place in (properties, properties.get("key_value_pairs"), properties.get("data")):
        if not isinstance(place, Mapping):
            continue
        lower = {str(k).lower(): v for k, v in place.items()}
        for key in _NAME_KEYS:
            value = lower.get(key)
            if isinstance(value, (str, int, np.integer)) and not isinstance(value, bool) and str(value).strip():
                return str(value).strip()
    return None


def _add_implicit_hydrogens(mol) -> tuple[Any, list[str]]:
    """The RDKit molecule with its implicit hydrogens made explicit (coordinates from the geometry), and a note."""
    from rdkit import Chem

    implicit = sum(a.GetNumImplicitHs() for a in mol.GetAtoms()) if _sanitized(mol) else 0
    if not implicit:
        return mol, []
    return Chem.AddHs(mol, addCoords=True), [f"added {implicit} implicit hydrogens (RDKit, coordinates from the "
                                             "geometry)"]


def _rdkit_input(mol, name: str, source: str, reader: str, notes: list[str], smiles: str | None = None
                 ) -> AssemblyInput:
    """A lone molecule from an RDKit molecule with (at least) one conformer: its first one."""
    return AssemblyInput("molecule", name, source, reader,
                         np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64),
                         np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64), smiles=smiles, notes=notes)


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
    if not mol.GetConformer().Is3D():
        raise InputError(source, "no_coordinates", "the coordinates are 2-D (a drawing); give a 3-D structure or "
                         "use --smiles")
    mol, notes = _add_implicit_hydrogens(mol)
    name = (mol.GetProp("_Name").strip() if mol.HasProp("_Name") else "") or path.stem
    return _rdkit_input(mol, name, source, "rdkit", notes)


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
    names = [_row_name(r) or f"{path.stem}_{r.id}" for r in rows]
    if isinstance(selector, tuple):  # PATH@id=K: the row id, as `ase db` lists it
        ids = [r.id for r in rows]
        if selector[1] not in ids:
            shown = ", ".join(map(str, ids[:8])) + (f", ... {ids[-1]}" if len(ids) > 8 else "")
            raise InputError(source, "no_structure", f"no row with id {selector[1]} (ids {shown})")
        selector = ids.index(selector[1])
    row = _pick(rows, selector, source, "row", names)
    return _from_atoms(row.toatoms(), names[selector or 0], source, "ase.db")


def _read_cif(path: Path, selector: int | None, source: str) -> AssemblyInput:
    from kflow.molecular.crystals import read_cif

    problems = []
    crystals = list(read_cif(path, problems))
    if not crystals:
        problem = problems[0] if problems else None
        raise InputError(source, problem.reason if problem else "no_structure",
                         problem.message if problem else "no crystal structure in the file")
    if len(crystals) > 1:  # name each by its data block (its own title), not by its position
        crystals = [(atoms.info.get("block") or name, atoms) for name, atoms in crystals]
    name, atoms = _pick(crystals, selector, source, "data block", [name for name, _ in crystals])
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
    names = [_own_name(f.info) or (f"{path.stem}_{k}" if len(frames) > 1 else path.stem) for k, f in enumerate(frames)]
    atoms = _pick(frames, selector, source, "frame", names)
    return _from_atoms(atoms, names[selector or 0], source, "ase")


def _embed(mol, seed: int, source: str) -> tuple[Any, list[str]]:
    """An RDKit molecule (a graph) made 3-D: hydrogens added, one conformer embedded (ETKDGv3, ``seed``) and
    optimised with MMFF94 (UFF where MMFF has no parameters); notes say how. Refuses mixtures and attachment
    points ``*``."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

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
    return mol, notes


def molecule_from_smiles(smiles: str, seed: int = 0, name: str | None = None) -> AssemblyInput:
    """A molecule from SMILES: RDKit adds hydrogens, embeds one conformer (ETKDGv3, ``seed``) and optimises it
    with MMFF94 (UFF where MMFF has no parameters). Refuses mixtures (``.``) and polymer repeat units (``*``).

    Its name is ``name``, else a name written after the SMILES (``"c1ccccc1 benzene"``), else its formula."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    source = f"SMILES {smiles!r}"
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise InputError(source, "unreadable", "RDKit cannot parse the SMILES")
    own = mol.GetProp("_Name").strip() if mol.HasProp("_Name") else ""
    mol, notes = _embed(mol, seed, source)
    inp = _rdkit_input(mol, "", source, "rdkit (SMILES)", notes, smiles=smiles)
    inp.name = name or own or inp.formula
    return inp


def _from_rdkit_mol(mol, seed: int, name: str | None) -> AssemblyInput:
    """A lone molecule from an RDKit ``Mol``: its first 3-D conformer (implicit hydrogens added at coordinates
    from the geometry); without one (no conformer, or a 2-D drawing) a conformer is embedded as for SMILES."""
    from rdkit import Chem, rdBase

    own = name or (mol.GetProp("_Name").strip() if mol.HasProp("_Name") else "")
    source = f"RDKit Mol {own!r}" if own else "RDKit Mol"
    if mol.GetNumAtoms() == 0:
        raise InputError(source, "no_atoms", "the molecule has no atoms")
    with rdBase.BlockLogs():
        try:
            conformers = [c.GetId() for c in mol.GetConformers() if c.Is3D()]
            if conformers:
                notes = [] if mol.GetNumConformers() == 1 else [
                    f"used conformer {conformers[0]}, the first 3-D one of {mol.GetNumConformers()}"]
                one, implicit = _add_implicit_hydrogens(Chem.Mol(mol, False, conformers[0]))
                notes += implicit
            else:
                what = "a 2-D conformer (a drawing)" if mol.GetNumConformers() else "no conformer"
                one, notes = _embed(Chem.Mol(mol), seed, source)
                notes.insert(0, f"the Mol has {what}: embedded a 3-D one")
        except InputError:
            raise
        except Exception as err:  # an unsanitisable or otherwise broken Mol: RDKit's reason in one line
            raise InputError(source, "unreadable", f"RDKit cannot use the Mol ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    inp = _rdkit_input(one, own, source, "rdkit (Mol)", notes)
    inp.name = own or inp.formula
    return inp


def _from_ase_object(atoms, name: str | None, source: str | None = None, reader: str = "ase (Atoms)"
                     ) -> AssemblyInput:
    """A crystal from an ``ase.Atoms`` periodic along all three axes, else a lone molecule (a copy: the caller's
    object is never changed). Named by ``name``, its ``info`` (``_own_name``), else the molecule's formula."""
    own = name or _own_name(atoms.info)
    source = source or (f"ASE Atoms {own!r}" if own else f"ASE Atoms {atoms.get_chemical_formula() or '(empty)'}")
    if len(atoms) == 0:
        raise InputError(source, "no_atoms", "the structure has no atoms")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any() and not _is_periodic(atoms):
        raise InputError(source, "partly_periodic", f"pbc={pbc.tolist()} with a cell of rank {atoms.cell.rank}: a "
                         "crystal needs a 3-D cell periodic along all three axes (pbc=True), a molecule none "
                         "(pbc=False)")
    inp = _from_atoms(atoms.copy(), own or "", source, reader)
    if inp.kind == "molecule" and atoms.cell.rank == 3:
        inp.notes.append("read as a molecule: the cell is ignored because pbc is False (set pbc=True for a crystal)")
    inp.name = own or inp.formula
    return inp


def _from_pymatgen(structure, name: str | None) -> AssemblyInput:
    """A crystal from a pymatgen ``Structure`` or a lone molecule from a ``Molecule`` (through ASE)."""
    from pymatgen.core import IStructure
    from pymatgen.io.ase import AseAtomsAdaptor

    kind = "Structure" if isinstance(structure, IStructure) else "Molecule"
    own = name or _own_name(getattr(structure, "properties", None))
    formula = structure.composition.hill_formula.replace(" ", "") if len(structure) else "(empty)"
    source = f"pymatgen {kind} {own!r}" if own else f"pymatgen {kind} {formula}"
    if len(structure) == 0:
        raise InputError(source, "no_atoms", "the structure has no atoms")
    if not structure.is_ordered:
        raise InputError(source, "disordered", "partial occupancies (a disordered structure); give one ordered "
                         "structure")
    try:
        atoms = AseAtomsAdaptor.get_atoms(structure)
    except Exception as err:  # dummy species and the like
        raise InputError(source, "unreadable", f"cannot convert it to atoms ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    if kind == "Structure":
        atoms.pbc = True
    return _from_ase_object(atoms, own, source, f"pymatgen ({kind})")


def _object_reader(x):
    """The reader of an in-memory structure (RDKit ``Mol``, ASE ``Atoms``, pymatgen ``Structure``/``Molecule``),
    or None. RDKit and pymatgen are only looked at when already imported (an object of theirs means they are)."""
    import sys

    from ase import Atoms

    if isinstance(x, Atoms):
        return _from_ase_object
    chem = sys.modules.get("rdkit.Chem")
    if chem is not None and isinstance(x, chem.Mol):
        return _from_rdkit_mol
    core = sys.modules.get("pymatgen.core")
    if core is not None and isinstance(x, (core.IStructure, core.IMolecule)):
        return _from_pymatgen
    return None


def _is_smiles(text: str) -> bool:
    """A string that is not a file (nor ``PATH@N`` of one) and parses as SMILES."""
    from rdkit import Chem, rdBase

    if not text.strip() or "\n" in text or Path(text).exists():
        return False
    base, at, _ = text.rpartition("@")
    if at and base and Path(base).exists():
        return False
    with rdBase.BlockLogs():
        return Chem.MolFromSmiles(text) is not None


InputLike = Union[str, "os.PathLike[str]", "AssemblyInput", Any]  # a path, SMILES, RDKit Mol, ASE Atoms, pymatgen


def read_assembly_input(source: InputLike, smiles: bool | None = None, seed: int = 0,
                        name: str | None = None) -> AssemblyInput:
    """A molecule or crystal (see the module docstring) from an RDKit ``Mol``, an ASE ``Atoms``, a pymatgen
    ``Structure`` or ``Molecule``, a path (``PATH`` or ``PATH@N``) or a SMILES string. ``smiles``: None reads a
    string as a path when that file exists, else as SMILES when RDKit parses it; True always as SMILES (the
    conformer is embedded with ``seed``); False always as a path. ``name`` replaces the structure's own name.

    Raises ``InputError`` (one line naming the input and the reason) for anything unusable: unreadable files,
    salts and mixtures, polymeric networks, linear or tiny molecules, overlapping atoms; ``FileNotFoundError`` for
    a missing file. The caller's object is never changed."""
    if isinstance(source, AssemblyInput):
        inp = source
        if name:
            inp = AssemblyInput(**{**vars(inp), "name": name})
    elif (reader := _object_reader(source)) is not None:
        if smiles:
            raise InputError(type(source).__name__, "not_smiles", "smiles=True takes a SMILES string")
        inp = reader(source, seed, name) if reader is _from_rdkit_mol else reader(source, name)
    elif not isinstance(source, (str, os.PathLike)):
        raise InputError(type(source).__name__, "unsupported_type", "give an RDKit Mol, an ASE Atoms, a pymatgen "
                         "Structure or Molecule, a SMILES string or a file path")
    elif smiles or (smiles is None and isinstance(source, str) and _is_smiles(source)):
        inp = molecule_from_smiles(str(source), seed, name)
    else:
        inp = _read_file(source, hint=smiles is None and isinstance(source, str))
        if name:
            inp.name = name
    _check_geometry(inp)
    return inp


def _read_file(source: str | os.PathLike, hint: bool = False) -> AssemblyInput:
    """A molecule or crystal from ``PATH`` or ``PATH@N``; ``hint``: a missing file may have been meant as SMILES."""
    path, selector = _split_selector(str(source))
    label = str(path)
    if not path.exists():
        smiles_hint = " (nor a SMILES string RDKit parses)" if hint and not path.suffix else ""
        raise FileNotFoundError(f"{path}: no such file{smiles_hint}")
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
        if selector is not None:
            inp.source = str(source)  # the chosen structure, as given: PATH@N or PATH@id=K
        return inp
    except (InputError, FileNotFoundError):
        raise
    except Exception as err:  # a reader failing on a malformed file is the file's problem, said in one line
        raise InputError(label, "unreadable", f"{type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'}") from None


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


def _isomeric_smiles(z: np.ndarray, pos: np.ndarray) -> str | None:
    """The isomeric SMILES RDKit perceives from a 3-D geometry (bond orders, else connectivity only; stereo from
    the coordinates), or None when it cannot."""
    from ase.data import chemical_symbols
    from rdkit import Chem, rdBase
    from rdkit.Chem import rdDetermineBonds

    block = f"{len(z)}\n\n" + "".join(f"{chemical_symbols[a]} {x:.6f} {y:.6f} {w:.6f}\n" for a, (x, y, w) in
                                      zip(z, pos))
    with rdBase.BlockLogs():
        for determine in (lambda m: rdDetermineBonds.DetermineBonds(m, charge=0),
                          rdDetermineBonds.DetermineConnectivity):
            try:
                mol = Chem.MolFromXYZBlock(block)
                determine(mol)
                Chem.AssignStereochemistryFrom3D(mol)
                return Chem.MolToSmiles(Chem.RemoveHs(mol, sanitize=False))
            except Exception:  # no consistent bond orders (charges, radicals): try connectivity alone
                continue
    return None


def mirror_note(atomic_numbers: np.ndarray, positions: np.ndarray) -> str:
    """One sentence on what ``mirror="half"`` makes of this molecule: RDKit perceives it from its geometry and
    from its mirror image (x → −x); different isomeric SMILES mean a chiral molecule, whose mirrored copies are its
    enantiomer (a racemic cluster, wrong for an enantiopure compound), equal ones an achiral molecule, whose
    mirrored copies are the same compound. Axial and planar chirality are not perceived."""
    z = np.asarray(atomic_numbers)
    pos = np.asarray(positions, dtype=np.float64)
    mirrored = int(_mirrored("half").sum())
    head = f"mirror half: {mirrored} of the {NUM_MOLECULES} copies are the mirror image (x -> -x) of the input"
    smiles, image = _isomeric_smiles(z, pos), _isomeric_smiles(z, pos * [-1.0, 1.0, 1.0])
    if smiles is None or image is None:
        return head + "; RDKit could not perceive the molecule, so whether they are its enantiomer is not known"
    if smiles != image:
        return (f"{head}; the molecule is chiral ({smiles}), so they are its enantiomer ({image}) and the cluster is "
                f"a racemate ({NUM_MOLECULES - mirrored}:{mirrored}); for an enantiopure compound use mirror none "
                "(--mirror none)")
    return f"{head}; the molecule is achiral ({smiles}), so they are the same compound in a mirrored conformer"


# Start presets that need only the molecule and a density: a lone molecule can be given the start its model knows.
FROM_MOLECULE_PRESETS = ("hard", "shell")


def lone_molecule_starts(inp: AssemblyInput, samples: int, seed: int = 0, mirror: str = "none",
                         volume_per_molecule: float | None = None, preset: str = "hard") -> list[Cluster]:
    """``samples`` start clusters of 17 copies of a lone molecule, drawn by a start ``preset`` that needs only the
    molecule and a density ("hard" or "shell", ``NOISE_PRESETS``), with seeds ``seed``·1000003 + k. There is no
    true cluster: ``final_positions`` repeat the start."""
    from kflow.molecular.crystals import NOISE_PRESETS

    volume = volume_per_molecule or estimate_volume_per_molecule(inp.atomic_numbers, inp.positions)
    copies = torch.from_numpy(_reference_copies(inp, mirror))  # [M, P, 3]
    m, p, _ = copies.shape
    z = torch.from_numpy(np.tile(inp.atomic_numbers, m))
    mol = torch.arange(m).repeat_interleave(p)
    out = []
    for k in range(samples):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
        start = NOISE_PRESETS[preset].apply(copies, gen, volume).reshape(-1, 3)
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
    """Sample indices, best first: fewest close contacts, then the lowest MMFF intermolecular energy where the
    samples were relaxed (``mmff_energy``), else the most compact (smallest centroid radius of gyration), then the
    lower index."""
    def key(k):
        second = scores[k].get("mmff_energy", scores[k]["radius_of_gyration"])
        return scores[k]["close_contacts"], second, k

    return sorted(range(len(scores)), key=key)


def relax_samples(positions: torch.Tensor, clusters: Sequence[Cluster], progress: bool = False):
    """Rigid-body MMFF relaxation (``relax.relax_cluster``) of every sample [S, N, 3]. Returns (relaxed positions
    [S, N, 3] float64, per sample {"mmff_energy", "mmff_energy_before", "relax_shift_rms"}, the start's energy
    (of the first sample's start), a note or None). Where no force field can be set up for the molecule, the
    samples are returned unrelaxed with a note saying why."""
    from tqdm.auto import tqdm

    from kflow.molecular.relax import relax_cluster

    out, rows = positions.clone(), []
    z, mol = clusters[0].atomic_numbers, clusters[0].molecule_index
    try:
        start = relax_cluster(z, clusters[0].initial_positions.double(), mol, max_steps=0, separate_rounds=0)
        for k in tqdm(range(len(clusters)), desc="relaxing", unit="sample", disable=not progress, leave=False):
            r = relax_cluster(z, positions[k], mol)
            out[k] = torch.as_tensor(r.positions, dtype=out.dtype)
            shift = float((out[k] - positions[k]).square().sum(-1).mean().sqrt())
            rows.append({"mmff_energy": r.energy_after, "mmff_energy_before": r.energy_before,
                         "relax_shift_rms": shift, "force_field": r.force_field})
    except ValueError as err:
        return positions, None, None, f"not relaxed: {str(err).splitlines()[0]}"
    return out, rows, start.energy_before, None


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


def _display_name(name: str) -> str:
    """A name as the outputs show it: one line of printable characters, no double quotes (a name read from a file,
    e.g. an ASE db row holding a newline or a backslash, must not break the extxyz comment line)."""
    return printable_name(name)


def _atoms(cluster: Cluster, positions: torch.Tensor, **info) -> Atoms:
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
    name = _display_name(chosen.crystal)
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


# ------------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True, eq=False)
class AssemblyModel:
    """A loaded pretrained model for ``assemble(model=...)``: load once, predict many times.

    ``net`` (the flow model, eval mode), ``rigid`` (its ``RigidKFlow``) and ``meta`` are what
    ``pretrained.load_pretrained`` returns; ``name`` and ``path`` are reported in the summary."""

    net: torch.nn.Module = field(repr=False)
    rigid: Any = field(repr=False)
    meta: dict = field(repr=False)
    name: str = "loaded model"
    path: str | None = None

    @classmethod
    def load(cls, model: str | os.PathLike = DEFAULT_MODEL, cache: bool = True) -> "AssemblyModel":
        """A shipped model by name (``pretrained.list_pretrained()``) or a pretrained file. With ``cache`` a file
        already loaded (same path, size and modification time) is reused: ``assemble(model="hard")`` loads the
        model once per process. ``clear_model_cache()`` forgets them."""
        import copy

        from kflow.molecular.pretrained import load_pretrained, resolve_pretrained

        path = resolve_pretrained(model)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        loaded = _MODEL_CACHE.pop(key, None) if cache else None  # popped and put back: the newest entry
        if loaded is None:
            loaded = load_pretrained(path)
        if cache:
            _MODEL_CACHE[key] = loaded
            while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
                _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
        net, rigid, meta = loaded
        return cls(net, rigid, copy.deepcopy(meta), str(model), str(path))


_MODEL_CACHE: dict[tuple[str, int, int], tuple] = {}
_MODEL_CACHE_SIZE = 4  # a shipped model is ~0.2 MB of weights; a few files at most in one session


def clear_model_cache() -> None:
    """Forget the models ``assemble`` / ``AssemblyModel.load`` loaded by name or path."""
    _MODEL_CACHE.clear()


ModelLike = Union[str, "os.PathLike[str]", AssemblyModel, tuple]


def _as_model(model: ModelLike) -> AssemblyModel:
    """An ``AssemblyModel`` from a name or file (cached), an ``AssemblyModel``, or ``load_pretrained``'s
    ``(model, rigid, meta)``."""
    from kflow.molecular.pretrained import _check_meta

    if isinstance(model, AssemblyModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return AssemblyModel.load(model)
    if isinstance(model, (tuple, list)) and len(model) == 3 and isinstance(model[2], dict):
        _check_meta(model[2], "model")
        return AssemblyModel(model[0], model[1], model[2])
    raise TypeError(f"model must be a shipped name, a pretrained file, an AssemblyModel or load_pretrained's "
                    f"(model, rigid, meta); got {type(model).__name__}")


# ------------------------------------------------------------------------------------------------------ results
@dataclass(eq=False)
class AssemblyResult:
    """What ``assemble`` predicts for one molecule or crystal.

    - ``predictions``: the predicted 17-molecule clusters as ``ase.Atoms`` (Å, no cell), best first; per-atom
      array ``mol_idx`` (molecule 0..16, each molecule's atoms contiguous and in the input's atom order) and
      ``info`` ``name``, ``arrangement``, ``sample``, ``rank`` (0 = best), as the frames of samples.extxyz.
    - ``starts``: the start cluster of each prediction, in the same order.
    - ``scores``: one dict per prediction, in the same order: ``sample``, ``rank`` (1 = best), ``start_seed`` (a
      lone molecule) or ``draw`` (a crystal), ``close_contacts``, ``radius_of_gyration`` (Å), ``collision_pct``,
      ``separation_pct`` (``contact_scores``) and, for a crystal, ``metrics`` (``truth_metrics``).
    - ``order``: the sample indices, best first (``rank_samples``).
    - ``truth``: the crystal's true 17-molecule cluster (``ase.Atoms``) for a crystal input, else None;
      ``metrics`` / ``start_metrics``: the best prediction's and its start's scores against it.
    - ``summary``: what summary.json holds (input, model, seed, steps, start, ranking, samples, rigidity, timings;
      ``files`` once written); ``input``: the ``AssemblyInput`` read.
    - ``write(folder)``: the files of ``kflow assemble --out folder``; ``files`` and ``folder`` then say which
      and where. ``total_s``: seconds ``assemble`` took (with writing when it wrote).
    """

    input: AssemblyInput
    predictions: list[Atoms]
    starts: list[Atoms]
    scores: list[dict]
    order: list[int]
    summary: dict
    truth: Atoms | None = None
    metrics: dict | None = None
    start_metrics: dict | None = None
    files: list[str] | None = None
    folder: Path | None = None
    total_s: float = 0.0
    clusters: list[Cluster] = field(default_factory=list, repr=False)  # the samples' clusters (starts, truth)
    positions: torch.Tensor | None = field(default=None, repr=False)  # [S, N, 3] float64, in sample order

    @property
    def name(self) -> str:
        """The molecule's (or crystal's) name, as the outputs show it."""
        return self.summary["input"]["name"]

    @property
    def notes(self) -> list[str]:
        """What the reader and the start did that the user may not expect (conformer, hydrogens, mirror, ...)."""
        return self.summary["input"]["notes"]

    @property
    def best(self) -> Atoms:
        """The first-ranked prediction (``predictions[0]``, written as pred.extxyz / pred.pdb)."""
        return self.predictions[0]

    def write(self, folder: str | os.PathLike) -> list[str]:
        """Write pred.extxyz, pred.pdb, start.extxyz, samples.extxyz (several samples), truth.extxyz (a crystal),
        cluster.png and summary.json into ``folder``, all of them or none (``write_assembly_outputs``); ``folder``
        is created, or replaced when it holds an earlier kflow assemble output only. Returns the file names."""
        files = write_assembly_outputs(folder, self.clusters, self.positions, self.order, self.summary,
                                       self.truth is not None)
        self.summary = {**self.summary, "files": files}
        self.files, self.folder = files, Path(folder)
        return files

    def __repr__(self) -> str:
        first = self.scores[0]
        text = (f"AssemblyResult({self.name!r}, {self.input.kind}, {len(self.predictions)} prediction(s); best: "
                f"sample {first['sample']}, {first['close_contacts']} close contacts")
        if self.metrics:
            text += f", PM-center matched {self.metrics['pm_center_matched']:.2f} Å"
        return text + (f"; written to {str(self.folder)!r})" if self.folder else ")")


# ----------------------------------------------------------------------------------------------------- pipeline
class _Phases:
    """One progress line over the steps of ``assemble`` (each may take a second or more: the first imports, the
    conformer, the model, sampling, plotting) and their wall times."""

    NAMES = ("reading input", "loading model", "building starts", "sampling", "scoring", "writing")

    def __init__(self, enabled: bool, writing: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(self.NAMES) - (not writing), bar_format="{desc} [{n_fmt}/{total_fmt}, {elapsed}]",
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


def _check_integer(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (minimum is not None
                                                                                and value < minimum):
        need = f"an integer >= {minimum}" if minimum is not None else "an integer"
        raise ValueError(f"{name} must be {need}, got {value!r}")


def assemble(x: InputLike, *, samples: int = DEFAULT_SAMPLES, model: ModelLike = DEFAULT_MODEL, seed: int = 0,
             out: str | os.PathLike | None = None, steps: int | None = None, mirror: str | None = None,
             progress: bool = False, smiles: bool | None = None, name: str | None = None,
             relax: bool = True) -> AssemblyResult:
    """Predict the 17-molecule packing of a molecule or a crystal (see the module docstring).

    ``x``: an RDKit ``Mol``, an ASE ``Atoms`` (a crystal when periodic along all three axes), a pymatgen
    ``Structure`` or ``Molecule``, a SMILES string, or a file (``PATH`` or ``PATH@N``); ``smiles`` True/False
    forces or forbids reading a string as SMILES (``read_assembly_input``); ``name`` replaces the structure's own.
    ``model``: a shipped name (``pretrained.list_pretrained()``) or a pretrained file, loaded once per process, or
    an ``AssemblyModel`` / ``load_pretrained``'s ``(model, rigid, meta)``. ``samples`` starts drawn with ``seed``
    are sampled in ``steps`` band steps (default: the model's ``sample_steps``) and ranked by ``contact_scores``;
    ``mirror`` ("none" | "half", default: the model's) applies to lone molecules; ``progress`` shows a progress line.
    ``relax`` (default): every sample is relaxed as 17 rigid molecules against MMFF94 (``relax.relax_cluster``,
    tethered to the sample) and ranked by close contacts, then MMFF intermolecular energy; the start's and each
    sample's contacts and energies (before and after) are in ``summary``.

    Returns an ``AssemblyResult`` (``.predictions``: ``ase.Atoms``, best first). ``out``: also write the files of
    ``kflow assemble --out`` there (as ``result.write(out)``). Every failure (bad input, missing model, an output
    folder that holds other files) raises before anything is written."""
    _check_integer("samples", samples, 1)
    _check_integer("seed", seed)
    if steps is not None:
        _check_integer("steps", steps, 1)
    if mirror is not None and mirror not in MIRROR_MODES:
        raise ValueError(f"mirror must be one of {MIRROR_MODES}, got {mirror!r}")
    out_dir = None if out is None else Path(out)
    if out_dir is not None:
        _check_out_dir(out_dir)
    phase = _Phases(progress, writing=out_dir is not None)
    try:
        result = _predict(x, model, smiles, name, int(samples), steps, int(seed), mirror, progress, phase,
                          bool(relax))
        if out_dir is not None:
            with phase("writing"):
                result.write(out_dir)
    finally:
        phase.close()
    result.total_s = phase.elapsed()
    return result


def _predict(x, model, smiles, name, samples, steps, seed, mirror, progress, phase: _Phases,
             relax: bool = True) -> AssemblyResult:
    with phase("reading input"):
        inp = read_assembly_input(x, smiles=smiles, seed=seed, name=name)
    with phase("loading model"):
        loaded = _as_model(model)
        net, rigid, meta = loaded.net, loaded.rigid, loaded.meta
        check_input(inp, meta, f"model {loaded.name!r}")
    notes = list(inp.notes)
    mirror_mode = mirror or meta["mirror"]
    with phase("building starts"):
        if inp.kind == "molecule":
            volume = estimate_volume_per_molecule(inp.atomic_numbers, inp.positions)
            lone_preset = meta["preset"] if meta["preset"] in FROM_MOLECULE_PRESETS else "hard"
            clusters = lone_molecule_starts(inp, samples, seed, mirror_mode, volume, lone_preset)
            references = torch.from_numpy(_reference_copies(inp, mirror_mode))[None].expand(samples, -1, -1, -1)
            start = {"preset": lone_preset, "mirror": mirror_mode,
                     "mirrored_copies": int(_mirrored(mirror_mode).sum()), "volume_per_molecule": volume,
                     "volume_source": f"van der Waals volume / packing coefficient {PACKING_COEFFICIENT}"}
            if meta["preset"] != lone_preset:
                notes.append(f"model {loaded.name!r} was trained on {meta['preset']!r} starts (each molecule near "
                             "its target); a lone molecule gets a 'hard' start, which it was not trained for")
            if mirror_mode == "half":
                notes.append(mirror_note(inp.atomic_numbers, inp.positions))
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
    _check_rigid(positions, references, clusters, sampler_residual)
    relaxed, start_energy = None, None
    if relax:
        with phase("relaxing"):
            positions, relaxed, start_energy, relax_note = relax_samples(positions, clusters, progress)
        if relax_note:
            notes.append(relax_note)
    with phase("scoring"):
        _check_rigid(positions, references, clusters, sampler_residual)
        scores = [contact_scores(positions[k], clusters[k]) for k in range(samples)]
        if relaxed is not None:
            for score, energy in zip(scores, relaxed):
                score.update(energy)
        order = rank_samples(scores)
        start_scores = contact_scores(clusters[order[0]].initial_positions.double(), clusters[order[0]])
        if start_energy is not None:
            start_scores["mmff_energy"] = start_energy
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
        "model": {"name": loaded.name, "path": loaded.path, "preset": meta["preset"],
                  "trained_mirror": meta["mirror"], "test_metrics": meta.get("test_metrics"),
                  "created": meta.get("created")},
        "seed": seed, "steps": steps, "method": "band", "num_samples": samples, "start": start,
        "ranking": f"fewest close contacts (< {CONTACT_FACTOR} x sum of Bondi radii, {HBOND_CONTACT_FACTOR} x for "
                   "hydrogen-bond pairs), then "
                   + ("lowest MMFF intermolecular energy after rigid-body relaxation" if relaxed is not None else
                      "smallest radius of gyration of the molecule centroids"),
        "relaxation": ({"method": "rigid-body relaxation of the 17 molecules against MMFF94 (UFF where MMFF has no "
                                  "parameters), tethered to the sample (kflow.molecular.relax.relax_cluster)",
                        "energy_unit": "kcal/mol, intermolecular"} if relaxed is not None else None),
        "start_scores": start_scores,
        "chosen_sample": best,
        "samples": sample_rows,
        "rigidity": {"tolerance_A": RIGID_TOLERANCE, "sampler_residual_A": sampler_residual,
                     "note": "each written molecule is its input geometry moved rigidly (float64 Kabsch onto the "
                             "sampled atoms); sampler_residual_A is how far the sampled atoms were from that"},
    }
    if truth:
        summary["metrics"] = sample_rows[best]["metrics"]
        summary["start_metrics"] = start_metrics
    # summary.json holds the times up to writing (the same whether written by assemble(out=...) or .write)
    summary["timings"] = {**phase.timings, "total_before_writing_s": phase.elapsed()}
    shown = _display_name(clusters[best].crystal)
    predictions = [_atoms(clusters[k], positions[k], name=shown, arrangement="predicted", sample=k, rank=r)
                   for r, k in enumerate(order)]
    starts = [_atoms(clusters[k], clusters[k].initial_positions, name=shown, arrangement="start", sample=k, rank=r)
              for r, k in enumerate(order)]
    truth_atoms = _atoms(clusters[best], clusters[best].final_positions, name=shown,
                         arrangement="crystal") if truth else None
    return AssemblyResult(input=inp, predictions=predictions, starts=starts, scores=[sample_rows[k] for k in order],
                          order=order, summary=summary, truth=truth_atoms, metrics=summary.get("metrics"),
                          start_metrics=start_metrics, clusters=list(clusters), positions=positions)


def _check_rigid(positions: torch.Tensor, references: torch.Tensor, clusters: Sequence[Cluster],
                 sampler_residual: float) -> None:
    """Every molecule must be a proper rigid motion of its reference; a violation is a bug, not a user error."""
    from kflow.molecular.geometry import rigid_residuals

    residual = rigid_residuals(references, _molecules(positions, clusters)).max().item()
    if residual > RIGID_TOLERANCE or sampler_residual > 1e-2:
        raise RuntimeError(f"predicted molecules are not rigid copies of the input (residual {residual:.3g} Å, "
                           f"sampler {sampler_residual:.3g} Å)")
