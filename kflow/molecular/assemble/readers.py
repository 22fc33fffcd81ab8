"""Reading an input of ``kflow assemble`` (``read_assembly_input``): RDKit ``Mol``, ASE ``Atoms``, pymatgen
``Structure``/``Molecule``, XYZ/MOL/SDF, SMILES, CIF, extxyz and ASE database rows, each with its own name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from kflow.molecular.data.cluster import InvalidCrystal
from kflow.utils.io import printable_name

from kflow.molecular.assemble.inputs import (CRYSTAL_SUFFIXES, DATABASE_SUFFIXES, MOLECULE_SUFFIXES, AssemblyInput,
                                            InputError, check_geometry)
from kflow.molecular.assemble.hydrogens import check_hydrogens
from kflow.molecular.data.molecules import BOND_FACTOR


__all__ = ["read_assembly_input", "molecule_from_smiles", "InputLike"]


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
    from kflow.molecular.data.bounds import cell_problem
    from kflow.molecular.data.molecules import find_molecules

    bounds = cell_problem(atoms.cell.array, len(atoms))  # before the periodic neighbour search
    if bounds:
        raise InputError(source, "out_of_bounds", bounds)
    try:
        molecules = find_molecules(atoms, BOND_FACTOR)
    except InvalidCrystal as err:
        raise InputError(source, err.reason, rejection_detail(err)) from None
    return AssemblyInput("crystal", name, source, reader, np.asarray(molecules.atomic_numbers, dtype=np.int64),
                         np.asarray(molecules.positions[0], dtype=np.float64), atoms=atoms, molecules=molecules)


def rejection_detail(err: InvalidCrystal) -> str:
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

    from kflow.molecular.data.crystals import row_name as _row_name

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
    from kflow.molecular.data.cif import read_cif

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
    charge = getattr(structure, "charge", 0) or 0
    if kind == "Molecule" and charge != 0:
        raise InputError(source, "charged", f"the Molecule has charge {charge:+g}; kflow packs neutral molecules "
                         "(a lone ion has no crystal of its own, and its force field and model are for neutral "
                         "ones): give the neutral molecule, with charge 0")
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
    salts and mixtures, polymeric networks, linear or tiny molecules, overlapping atoms, a charged pymatgen
    ``Molecule``, and a molecule known by its geometry only (not an RDKit ``Mol``, MOL/SDF or SMILES, whose bonds
    state the hydrogens) that lacks hydrogens (``hydrogens.check_hydrogens``); ``FileNotFoundError`` for a
    missing file. The caller's object is never changed."""
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
    check_geometry(inp)
    if not inp.reader.startswith("rdkit"):  # geometry only: are the hydrogens there?
        check_hydrogens(inp)
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
