"""Reading molecular crystals and building COD-Cluster17-style clusters from them.

Reading (``read_crystals``): CIF files block by block (``read_cif``: ASE's CIF parser with kflow's symmetry
expansion, pymatgen's ``CifParser`` as the second reader), ASE databases and extxyz files. Every input gives
crystals or a ``ReadProblem`` with a reason; nothing is dropped silently.

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

import functools
import io
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple

import numpy as np
import torch

from kflow.molecular.cluster import NUM_MOLECULES, Cluster, InvalidCrystal
from kflow.molecular.so3 import random_rotations

if TYPE_CHECKING:  # ase is imported lazily at run time
    from ase import Atoms

__all__ = ["read_crystals", "read_cif", "crystal_files", "cif_number", "ReadProblem", "build_cluster", "build_clusters",
           "find_molecules", "NoiseModel", "NOISE_PRESETS", "noise_model", "cell_problem", "MIN_CELL_WIDTH",
           "MAX_CELL_LENGTH", "MIN_VOLUME_PER_ATOM", "MAX_CELL_ATOMS"]


# --------------------------------------------------------------------------------------------------- reading
FOLDER_SUFFIXES = (".cif",)  # what a folder given as input contributes
# Resource bounds, checked when a crystal is read, before any neighbour search: the work of the periodic searches
# grows as (cutoff / cell width)^3 x atoms, so a 9 KB CIF with a 0.0001 A cell ran for minutes at 7 GB. CSD-500
# spans widths 3.5-24 A, 7.6-30 A^3 per atom, at most 200 atoms per cell and 42 A per edge (measured 2026-12).
MIN_CELL_WIDTH = 2.0  # A, distance between opposite faces of the cell
MAX_CELL_LENGTH = 1000.0  # A, longest cell edge
MIN_VOLUME_PER_ATOM = 3.0  # A^3 (diamond, the densest solid of light elements: 5.7)
MAX_CELL_ATOMS = 10_000  # atoms in the full cell, after symmetry expansion
# Bonded pairs (both directions) per atom of the cell, on average, when molecules are found: at most 2.4 in the 1241
# crystals of CSD-500, pyxtal's database and 591 benchmark CIFs (measured 2026-12); more means atoms piled together,
# a broken cell (checked while searching, before the pairs fill memory).
MAX_BONDED_PAIRS_PER_ATOM = 16


class ReadProblem(NamedTuple):
    """An input (a file, a CIF block or a database row) that gave no crystal: ``source`` names it, ``reason`` is a
    tag (``unreadable``, ``no_structure``, ``no_cell``, ``no_atoms``, ``missing_coordinates``) and ``file`` is
    the input file it belongs to."""

    source: str
    message: str
    reason: str = "unreadable"
    file: str = ""


class _Unusable(Exception):
    """A CIF block that is readable but cannot give a crystal (a rejection with a reason, not a reader failure)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def crystal_files(path: str | os.PathLike) -> list[Path]:
    """The input files ``read_crystals(path)`` reads: ``path`` itself, or the ``.cif`` files of a folder (sorted).
    Raises ``FileNotFoundError`` for a missing path or a folder without CIF files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: folder contains no .cif files")
        return files
    return [path]


def cell_problem(cell, num_atoms: int) -> str | None:
    """Why a periodic cell (3x3 rows, Å) holding ``num_atoms`` atoms is outside kflow's resource bounds
    (``MIN_CELL_WIDTH``, ``MAX_CELL_LENGTH``, ``MIN_VOLUME_PER_ATOM``, ``MAX_CELL_ATOMS``), or None."""
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape != (3, 3) or not np.isfinite(cell).all():
        return "the cell is not a finite 3x3 matrix"
    volume = abs(float(np.linalg.det(cell)))
    faces = np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    width = volume / faces.max() if faces.max() > 0 else 0.0
    if width < MIN_CELL_WIDTH:
        return f"the cell is {width:.3g} Å thin (at least {MIN_CELL_WIDTH} Å between opposite faces)"
    if np.linalg.norm(cell, axis=1).max() > MAX_CELL_LENGTH:
        return f"a cell edge is {np.linalg.norm(cell, axis=1).max():.4g} Å long (at most {MAX_CELL_LENGTH:g} Å)"
    if num_atoms > MAX_CELL_ATOMS:
        return f"{num_atoms} atoms in the cell (at most {MAX_CELL_ATOMS})"
    if num_atoms and volume / num_atoms < MIN_VOLUME_PER_ATOM:
        return (f"{volume / num_atoms:.3g} Å³ per atom (at least {MIN_VOLUME_PER_ATOM} Å³: atoms this dense are "
                "a broken cell)")
    return None


def _bounds_problem(atoms) -> str | None:
    """``cell_problem`` of a periodic ``Atoms`` (None for a structure without a 3-D cell)."""
    if not (np.all(atoms.pbc) and atoms.cell.rank == 3):
        return None
    return cell_problem(atoms.cell.array, len(atoms))


def read_crystals(path: str | os.PathLike, errors: list | None = None) -> Iterator[tuple[str, "Atoms"]]:
    """Yield ``(name, ase.Atoms)`` from a CIF file, a folder of CIFs, an ASE database (.db/.json) or an extxyz file.

    Names come from the CSD refcode where the source has one (ASE db keys ``csd_code``/``refcode``/``NAME``/
    ``name``, also inside a row's ``data`` or ``info``; extxyz ``NAME``), else from the file name (and the frame or
    block index). Every crystal carries ``atoms.info["source"]`` (its file) and ``atoms.info["reader"]``.

    CIF files are read block by block (see ``read_cif``): ASE's CIF parser with kflow's symmetry expansion first,
    pymatgen's ``CifParser`` second. An input that gives no crystal is skipped; when ``errors`` is a list, a
    ``ReadProblem`` (source, message, reason, file) is appended for it, so one bad file never stops a large build
    and no file is dropped silently. With ``errors=None`` the first problem raises ``ValueError``.
    """
    for file in crystal_files(path):
        suffix = file.suffix.lower()
        if suffix == ".cif":
            yield from read_cif(file, errors)
        elif suffix in (".db", ".json"):
            yield from _read_ase_db(file, errors)
        else:
            yield from _read_ase_frames(file, errors)


def _problem(errors, source, message, reason="unreadable", file=None):
    problem = ReadProblem(str(source), message, reason, str(file if file is not None else source))
    if errors is None:
        raise ValueError(f"{problem.source}: {reason}: {message}")
    errors.append(problem)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


_NAME_KEYS = ("csd_code", "refcode", "name", "identifier")


def _row_name(row) -> str | None:
    """A CSD refcode or name stored with an ASE database row: its key-value pairs, then ``data`` and ``info``
    dictionaries (any letter case, e.g. ``NAME``)."""
    places = [getattr(row, "key_value_pairs", None) or {}]
    data = row.get("data") or {}
    info = row.get("info") or {}
    places += [d for d in (data, info, data.get("info") if isinstance(data, dict) else None) if isinstance(d, dict)]
    for place in places:
        lower = {str(k).lower(): v for k, v in place.items()}
        for key in _NAME_KEYS:
            value = lower.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def _read_ase_db(path: Path, errors):
    import ase.db

    try:
        rows = list(ase.db.connect(str(path)).select())
    except Exception as err:
        _problem(errors, path, f"cannot be read as an ASE database ({_describe(err)})")
        return
    if not rows:
        _problem(errors, path, "the database holds no structures", "no_structure")
    for row in rows:
        name = _row_name(row) or f"{path.stem}_{row.id}"
        try:
            atoms = row.toatoms()
        except Exception as err:  # a broken row must not end the iteration
            _problem(errors, f"{path}:{row.id}", _describe(err), file=path)
            continue
        bounds = _bounds_problem(atoms)
        if bounds:
            _problem(errors, f"{path}:{row.id}", bounds, "out_of_bounds", path)
            continue
        atoms.info.update(source=str(path), reader="ase")
        yield str(name), atoms


def _read_ase_frames(path: Path, errors):
    import ase.io

    fmt = "extxyz" if path.suffix.lower() in (".xyz", ".extxyz") else None
    try:
        frames = ase.io.read(str(path), index=":", format=fmt)
    except Exception as err:
        _problem(errors, path, f"cannot be read as {fmt or 'a crystal file'} ({_describe(err)})")
        return
    if not frames:
        _problem(errors, path, "the file holds no structures", "no_structure")
    for i, atoms in enumerate(frames):
        name = atoms.info.get("NAME") or atoms.info.get("name") or (
            path.stem if len(frames) == 1 else f"{path.stem}_{i}")
        bounds = _bounds_problem(atoms)
        if bounds:
            _problem(errors, f"{path}:{i}" if len(frames) > 1 else path, bounds, "out_of_bounds", path)
            continue
        atoms.info.update(source=str(path), reader="ase")
        yield str(name), atoms


# ------------------------------------------------------------------------------------------------------ CIF
_CELL_LENGTHS = ("_cell_length_a", "_cell_length_b", "_cell_length_c")
_CELL_ANGLES = ("_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma")
_FRACT = ("_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z")
_CARTN = ("_atom_site_cartn_x", "_atom_site_cartn_y", "_atom_site_cartn_z")
_SYMOP_TAGS = ("_space_group_symop_operation_xyz", "_space_group_symop.operation_xyz", "_symmetry_equiv_pos_as_xyz")
_HALL_TAGS = ("_space_group_name_hall", "_symmetry_space_group_name_hall", "_space_group.name_hall")
_HM_TAGS = ("_space_group_name_h-m_alt", "_symmetry_space_group_name_h-m", "_space_group.name_h-m_alt",
            "_space_group_name_h-m_full", "_space_group.name_h-m_full")
_NUMBER_TAGS = ("_space_group_it_number", "_symmetry_int_tables_number", "_space_group.it_number")
_NUMBER = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:\(\d+\)?)?")
_FRACTION = re.compile(r"([+-]?\d+)/(\d+)")
DUPLICATE_TOLERANCE = 0.1  # Å: symmetry copies of one site (or repeated sites of one element) closer than this merge


def cif_number(value, default: float | None = None) -> float | None:
    """A CIF numeric value as a float, per the CIF conventions: ``?`` (unknown), ``.`` (inapplicable) and a missing
    value give ``default``; a standard uncertainty in parentheses (``0.123(4)``) is dropped; quoted numbers and
    fractions (``1/2``) are accepted. Raises ``ValueError`` for anything else."""
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip().strip("'\"").strip()
    if text in ("?", ".", ""):
        return default
    match = _NUMBER.fullmatch(text) or _FRACTION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a CIF number: {value!r}")
    if match.re is _FRACTION:
        return int(match.group(1)) / int(match.group(2))
    return float(match.group(1))


def _tag(block, names):
    """The first of ``names`` present with a value other than ``?``/``.`` (a single value or a loop column)."""
    for name in names:
        value = block.get(name)
        if value is None:
            continue
        if isinstance(value, list):
            if value and not all(str(v).strip() in ("?", ".") for v in value):
                return value
        elif str(value).strip() not in ("?", ".", ""):
            return value
    return None


def _column(block, name, n):
    value = block.get(name)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if len(values) != n:
        raise ValueError(f"loop column {name} has {len(values)} values for {n} atom sites")
    return values


def _cell_parameters(block) -> list[float] | None:
    """a, b, c, α, β, γ, or None if a length is missing or unknown. A missing or inapplicable (``.``) angle is
    90° (the CIF default); an unknown one (``?``) makes the cell incomplete."""
    try:
        lengths = [cif_number(block.get(t)) for t in _CELL_LENGTHS]
        angles = [cif_number(block.get(t), 90.0) if str(block.get(t, "")).strip() != "?" else None
                  for t in _CELL_ANGLES]
    except ValueError:
        return None
    values = lengths + angles
    if any(v is None for v in values) or min(lengths) <= 0 or not all(0 < a < 180 for a in angles):
        return None
    return values


def _classify_block(block) -> str | None:
    """"structure" (a cell and atom coordinates), "no_cell", "no_atoms", "unreadable" (some structure tags but
    neither a complete cell nor coordinates) or None (no structure tags at all: a publication or global block)."""
    has_coords = all(t in block for t in _FRACT) or all(t in block for t in _CARTN)
    has_cell = _cell_parameters(block) is not None
    if has_coords and has_cell:
        return "structure"
    if has_coords:
        return "no_cell"
    if has_cell:
        return "no_atoms"
    if any(str(t).startswith(("_atom_site", "_cell_length", "_cell_angle")) for t in block):
        return "unreadable"
    return None


_BLOCK_MESSAGES = {
    "no_cell": "atom sites but no complete unit cell (_cell_length_a/b/c and angles)",
    "no_atoms": "a unit cell but no atom coordinates (_atom_site_fract_x/y/z or _atom_site_Cartn_x/y/z)",
    "unreadable": "neither a complete unit cell nor atom coordinates",
}


def _element_number(symbol, type_symbol: bool) -> int:
    """Atomic number from a type symbol (``C``, ``Cl``, ``CL``, ``O2-``) or a site label (``C12``, ``Cl1A``, ``H3'``);
    deuterium and tritium are hydrogen; 0 when no element can be recognised (dummy atoms, ``Q`` peaks, ``?``)."""
    from ase.data import atomic_numbers

    match = re.match(r"\s*([A-Za-z]+)", str(symbol))
    if match is None:
        return 0
    letters = match.group(1)
    two = letters[:2].capitalize()
    if len(letters) >= 2 and two in atomic_numbers and (letters[1].islower() or (type_symbol and len(letters) == 2)):
        return atomic_numbers[two]
    one = letters[0].upper()
    return {"D": 1, "T": 1}.get(one, atomic_numbers.get(one, 0))


def _parse_symop(op: str) -> tuple[np.ndarray, np.ndarray]:
    """One symmetry operation in the CIF xyz form (``-x+1/2, y, 1/2-z``, ``X,Y-X,Z+0.25``) -> (R [3, 3], t [3])."""
    parts = str(op).strip().strip("'\"").lower().replace(" ", "").split(",")
    if len(parts) != 3:
        raise ValueError(f"symmetry operation {op!r} does not have three components")
    rot, trans = np.zeros((3, 3)), np.zeros(3)
    for row, part in enumerate(parts):
        terms = re.findall(r"[+-]?[^+-]+", part)
        if not terms or "".join(terms) != part:
            raise ValueError(f"symmetry operation {op!r} cannot be parsed")
        for term in terms:
            sign = -1.0 if term.startswith("-") else 1.0
            term = term.lstrip("+-")
            if term[-1:] in ("x", "y", "z"):
                coef = term[:-1].rstrip("*")
                value = cif_number(coef) if coef else 1.0
                rot[row, "xyz".index(term[-1])] += sign * value
            else:
                trans[row] += sign * cif_number(term)
    if abs(abs(np.linalg.det(rot)) - 1) > 1e-6 or not np.allclose(rot, np.round(rot)):
        raise ValueError(f"symmetry operation {op!r} is not a crystallographic operation")
    return rot, trans


@functools.lru_cache(maxsize=1)
def _spacegroup_tables():
    """spglib's 530 Hall settings as look-up tables: Hall symbol -> setting, H-M symbol -> settings (in spglib's
    order, the standard one first), (H-M symbol, setting choice) -> setting, IT number -> standard setting."""
    hall, hm, hm_choice, number = {}, {}, {}, {}
    for h in range(1, 531):
        t = _spacegroup_type(h)
        hall.setdefault(_hall_key(t.hall_symbol), h)
        names = {t.international_full, *[s.strip() for s in t.international.split("=")]}
        if t.number not in number:
            number[t.number] = h
            names.add(t.international_short)
        for name in names:
            key = _hm_key(name)
            hm.setdefault(key, [])
            if h not in hm[key]:
                hm[key].append(h)
            if t.choice:
                hm_choice.setdefault((key, t.choice.lower()), h)
    return hall, hm, hm_choice, number


def _hall_key(symbol: str) -> str:
    return " ".join(str(symbol).replace("_", " ").split()).lower()


_OLD_HM_NAMES = {"Abm2": "Aem2", "Aba2": "Aea2", "Cmca": "Cmce", "Cmma": "Cmme", "Ccca": "Ccce"}


def _hm_key(symbol: str) -> str:
    text = str(symbol).replace("_", "").replace(" ", "")
    text = text[:1].upper() + text[1:].lower()
    return _OLD_HM_NAMES.get(text, text)


def _setting_from_symbol(hm: str | None, hall: str | None, number: int | None) -> tuple[int, str]:
    """spglib Hall setting number and a description, from the Hall symbol, else the H-M symbol (full or short, with
    an optional ``:choice`` suffix; short monoclinic symbols like ``P 21/n`` are b-unique), else the IT number
    (standard setting), else P 1. Raises ``ValueError`` when a symbol is given but matches no setting, or contradicts
    the IT number."""
    tables_hall, tables_hm, tables_choice, tables_number = _spacegroup_tables()
    problems = []
    if hall is not None:
        h = tables_hall.get(_hall_key(hall))
        if h is not None and (number is None or _spacegroup_number(h) == number):
            return h, f"Hall symbol {hall!r}"
        problems.append(f"Hall symbol {hall!r} " + ("matches no setting" if h is None else
                                                    f"(No. {_spacegroup_number(h)}) contradicts No. {number}"))
    if hm is not None:
        base, _, choice = re.sub(r"\(.*?\)", "", str(hm)).partition(":")
        key = _hm_key(base)
        h = tables_choice.get((key, choice.strip().lower())) if choice.strip() else None
        if h is None and key in tables_hm:
            h = tables_hm[key][0]
        if h is None and len(key) > 1 and re.fullmatch(r"[PABCFIR][^/]*(/[a-z])?", key):
            candidates = tables_hm.get(f"{key[0]}1{key[1:]}1")  # short monoclinic symbol: b unique (P 21/n)
            h = candidates[0] if candidates else None
        if h is not None and (number is None or _spacegroup_number(h) == number):
            return h, f"H-M symbol {hm!r}"
        problems.append(f"H-M symbol {hm!r} " + ("matches no setting" if h is None else
                                                 f"(No. {_spacegroup_number(h)}) contradicts No. {number}"))
    if problems:  # a symbol given but not understood: guessing the setting from the number could be wrong
        raise ValueError("; ".join(problems))
    if number is not None:
        if number not in tables_number:
            raise ValueError(f"space-group number {number} is not between 1 and 230")
        return tables_number[number], f"IT number {number} (standard setting)"
    return 1, "none given (P 1)"


def _spacegroup_type(hall_number: int):
    import spglib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # spglib's notice about its error handling
        return spglib.get_spacegroup_type(hall_number)


def _spacegroup_number(hall_number: int) -> int:
    return _spacegroup_type(hall_number).number


def _symmetry_operations(block) -> tuple[np.ndarray, np.ndarray, str]:
    """(rotations [K, 3, 3], translations [K, 3], description) acting on fractional coordinates. Explicit
    operations in the file win; otherwise the Hall symbol, the H-M symbol or the IT number select a setting of
    spglib's table (which holds all 530 settings, so ``P 1 21/n 1`` or ``P 21/a`` are found)."""
    ops = _tag(block, _SYMOP_TAGS)
    if ops is not None:
        parsed = [_parse_symop(op) for op in (ops if isinstance(ops, list) else [ops])]
        rot, trans = np.stack([p[0] for p in parsed]), np.stack([p[1] for p in parsed])
        if not any(np.allclose(r, np.eye(3)) and np.allclose(t, np.round(t)) for r, t in zip(rot, trans)):
            rot, trans = np.concatenate([np.eye(3)[None], rot]), np.concatenate([np.zeros((1, 3)), trans])
        return rot, trans, f"{len(parsed)} symmetry operations listed in the file"
    import spglib

    number = _tag(block, _NUMBER_TAGS)
    number = None if number is None else int(cif_number(number))
    hall = _tag(block, _HALL_TAGS)
    hm = _tag(block, _HM_TAGS)
    setting, how = _setting_from_symbol(hm, hall, number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sym = spglib.get_symmetry_from_database(setting)
    return sym["rotations"].astype(float), sym["translations"], how


def _later_duplicates(frac: np.ndarray, numbers: np.ndarray, cell: np.ndarray, tol: float,
                      max_pairs: int = 4_000_000) -> np.ndarray:
    """Which atoms (fractional ``frac`` [N, 3] in ``cell``) are a later copy of an earlier atom of the same element:
    closer than ``tol`` under periodicity. The first atom of each such group stays.

    Exact copies (symmetry images on a special position) collapse first, by their rounded coordinates; the others
    are compared only with the atoms of neighbouring voxels at least ``tol`` wide, ``max_pairs`` pairs at a time.
    The work grows with the atoms that are actually close, and the memory stays bounded: ASE's neighbour list pads
    every 3 Å bin to its fullest, so a 1 KB Fm-3m CIF whose 1152 copies sit on 8 points took 750 MB (5 GB and 24 s
    with 26 sites). Valid for ``tol`` below half the cell's width (``MIN_CELL_WIDTH``)."""
    n = len(frac)
    frac = np.asarray(frac, dtype=np.float64) % 1.0
    numbers = np.asarray(numbers, dtype=np.int64)
    drop = np.zeros(n, dtype=bool)
    if n < 2:
        return drop
    key = np.round(frac * 1e9).astype(np.int64) % 1_000_000_000  # the same point, whatever the float rounding
    _, first, inverse = np.unique(np.concatenate([numbers[:, None], key], 1), axis=0, return_index=True,
                                  return_inverse=True)
    drop[first[inverse.reshape(-1)] != np.arange(n)] = True
    idx = np.flatnonzero(~drop)  # increasing: local order is file order
    pos, z = frac[idx], numbers[idx]
    widths = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    m = np.maximum(np.floor(widths / tol).astype(np.int64), 1)  # voxels per axis, each at least tol wide
    vox = np.floor(pos * m).astype(np.int64) % m
    vid = (vox[:, 0] * m[1] + vox[:, 1]) * m[2] + vox[:, 2]
    order = np.argsort(vid, kind="stable")
    sorted_vid = vid[order]
    steps = [np.unique(np.array([-1, 0, 1]) % mc) for mc in m]
    for d0 in steps[0]:
        for d1 in steps[1]:
            for d2 in steps[2]:
                near = ((((vox[:, 0] + d0) % m[0]) * m[1] + (vox[:, 1] + d1) % m[1]) * m[2]
                        + (vox[:, 2] + d2) % m[2])
                lo = np.searchsorted(sorted_vid, near, "left")
                counts = np.searchsorted(sorted_vid, near, "right") - lo
                ends = np.cumsum(counts)
                start = 0
                while start < len(idx):
                    base = ends[start - 1] if start else 0
                    stop = max(int(np.searchsorted(ends, base + max_pairs, "right")), start + 1)
                    c = counts[start:stop]
                    a = np.repeat(np.arange(start, stop), c)
                    offsets = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
                    b = order[np.repeat(lo[start:stop], c) + offsets]
                    keep = (b > a) & (z[a] == z[b])
                    a, b = a[keep], b[keep]
                    diff = pos[b] - pos[a]
                    diff -= np.round(diff)  # the nearest image (exact below half the cell width)
                    close = np.linalg.norm(diff @ cell, axis=1) < tol
                    drop[idx[b[close]]] = True
                    start = stop
    return drop


def _block_atoms(block) -> "Atoms":
    """A structure block (``_classify_block``) -> periodic ``ase.Atoms`` of the full cell (kflow's reader on ASE's
    parse).

    Sites are expanded with the block's symmetry; copies of a site (special positions) and repeated sites of one
    element closer than ``DUPLICATE_TOLERANCE`` merge. Occupancies (``?``/``.``/missing = 1) go to
    ``atoms.info["occupancy"]`` in ASE's layout ({site: {symbol: occupancy}}, ``atoms.get_tags()`` = site)."""
    from ase import Atoms
    from ase.data import chemical_symbols
    from ase.geometry import cellpar_to_cell

    cell = cellpar_to_cell(_cell_parameters(block))
    fract = all(t in block for t in _FRACT)
    raw = [block.get(t) for t in (_FRACT if fract else _CARTN)]
    raw = [v if isinstance(v, list) else [v] for v in raw]
    n = len(raw[0])
    bounds = cell_problem(cell, n)  # before the symmetry expansion and its neighbour search
    if bounds:
        raise _Unusable("out_of_bounds", bounds)
    labels = _column(block, "_atom_site_label", n) or [f"site{i + 1}" for i in range(n)]
    symbols = _column(block, "_atom_site_type_symbol", n)
    numbers = np.array([_element_number(s, symbols is not None) for s in (symbols or labels)], dtype=np.int64)
    coords = np.array([[cif_number(v) if cif_number(v) is not None else np.nan for v in col] for col in raw]).T
    if np.isnan(coords).any():
        i = int(np.nonzero(np.isnan(coords).any(1))[0][0])
        raise _Unusable("missing_coordinates", f"atom site {labels[i]} has no coordinates ('?' or '.')")
    occupancy = np.array([cif_number(v, 1.0) for v in (_column(block, "_atom_site_occupancy", n) or [1.0] * n)])
    flags = _column(block, "_atom_site_calc_flag", n)
    keep = np.ones(n, dtype=bool) if flags is None else np.array([str(f).lower() != "dum" for f in flags])
    frac = coords if fract else coords @ np.linalg.inv(cell)
    frac, numbers, occupancy, site = frac[keep], numbers[keep], occupancy[keep], np.arange(n)[keep]
    rot, trans, how = _symmetry_operations(block)
    k = len(rot)
    if n * k > MAX_CELL_ATOMS:
        raise _Unusable("out_of_bounds", f"{n} sites x {k} symmetry operations: more than {MAX_CELL_ATOMS} atoms")
    images = (np.einsum("kij,nj->nki", rot, frac) + trans[None]) % 1.0  # [N, K, 3]
    atoms = Atoms(numbers=np.repeat(numbers, k), scaled_positions=images.reshape(-1, 3), cell=cell, pbc=True)
    # a later copy of an earlier atom of the same element goes
    drop = _later_duplicates(images.reshape(-1, 3), atoms.numbers, cell, DUPLICATE_TOLERANCE)
    atoms = atoms[~drop]
    sites = np.repeat(site, k)[~drop]
    occ = np.repeat(occupancy, k)[~drop]
    atoms.set_tags(sites)
    if "_atom_site_occupancy" in block:
        atoms.info["occupancy"] = {str(s): {chemical_symbols[zz]: float(o)} for s, zz, o in
                                   zip(sites.tolist(), atoms.numbers.tolist(), occ.tolist())}
    atoms.info["symmetry"] = how
    return atoms


def _pymatgen_atoms(text: str, block_name: str | None = None) -> list[tuple[str, "Atoms"]]:
    """Structures of a CIF text read by pymatgen's ``CifParser`` (the second reader): [(block name, Atoms)], one
    block or all. A block whose space group pymatgen cannot interpret (it would silently fall back to P 1) fails."""
    from ase import Atoms
    from ase.data import atomic_numbers
    from pymatgen.io.cif import CifFile, CifParser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cif = CifFile.from_str(text)
    blocks = cif.data
    if block_name is not None:
        blocks = {k: v for k, v in blocks.items() if k.lower() == block_name.lower()}
        if not blocks:
            raise ValueError(f"pymatgen finds no block {block_name!r}")
    out = []
    for name, block in blocks.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            structures = CifParser.from_str(str(block)).parse_structures(primitive=False, check_occu=False,
                                                                         on_error="raise")
        messages = [str(w.message) for w in caught]
        declared = any(str(k).lower() in _HALL_TAGS + _HM_TAGS + _NUMBER_TAGS for k in block.data)
        if declared and any("Defaulting to P1" in m for m in messages):
            raise ValueError("pymatgen cannot interpret the block's space group (it would read it as P 1)")
        if not structures:
            raise ValueError("pymatgen finds no structure" + (f" ({messages[-1]})" if messages else ""))
        for structure in structures:
            numbers, occupancy = [], {}
            for s, site in enumerate(structure):
                species = site.species.get_el_amt_dict()
                major = max(species, key=species.get)
                numbers.append(atomic_numbers.get(major, 0))
                occupancy[str(s)] = {el: float(v) for el, v in species.items()}
            atoms = Atoms(numbers=numbers, positions=structure.cart_coords, cell=structure.lattice.matrix, pbc=True)
            atoms.set_tags(np.arange(len(atoms)))
            atoms.info["occupancy"] = occupancy
            out.append((name, atoms))
    return out


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # CIF 1.1 is ASCII; older files carry Latin-1 names in text fields


def read_cif(path: str | os.PathLike, errors: list | None = None) -> Iterator[tuple[str, "Atoms"]]:
    """Crystals of one CIF file, block by block; every block and file gives a crystal or a ``ReadProblem``.

    Reader 1 (``info["reader"] == "ase"``): ASE's CIF parser for the tags, kflow for the structure: cell and
    values per the CIF conventions (``?``, ``.``, uncertainties), symmetry from the listed operations, else the
    Hall symbol, the H-M symbol (full or short, any setting) or the IT number via spglib's settings table.
    Reader 2 (``"pymatgen"``): pymatgen's ``CifParser``, for a block (or a file) reader 1 cannot interpret.
    Blocks without structure tags (publication data) are skipped; a file without any structure is reported as
    ``no_structure``, a block with atoms but no cell as ``no_cell``, a cell without atoms as ``no_atoms``.
    """
    from ase.io.cif import parse_cif

    path = Path(path)
    try:
        text = _decode(path.read_bytes())
    except OSError as err:
        _problem(errors, path, f"cannot be read ({_describe(err)})")
        return
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            blocks = list(parse_cif(io.StringIO(text)))
        dropped = [str(w.message) for w in caught if "Wrong number" in str(w.message)]
        if dropped:  # ASE's tokenizer skipped a loop row with a wrong number of values: atoms could be missing
            raise ValueError(f"a loop row has the wrong number of values ({dropped[0][:200]})")
    except Exception as ase_error:  # the tokenizer failed on the file: the second reader takes the whole file
        try:
            found = _pymatgen_atoms(text)
            if not found:
                raise ValueError("no structure found")
        except Exception as err:
            _problem(errors, path, f"cannot be parsed as CIF (ase: {_describe(ase_error)}; pymatgen: "
                                   f"{_describe(err)})")
            return
        for i, (block_name, atoms) in enumerate(found):
            bounds = _bounds_problem(atoms)
            if bounds:
                _problem(errors, f"{path}:{block_name}", f"data block {block_name!r}: {bounds}", "out_of_bounds", path)
                continue
            atoms.info.update(source=str(path), reader="pymatgen", block=block_name)
            yield (path.stem if len(found) == 1 else f"{path.stem}_{i}"), atoms
        return
    kinds = [_classify_block(b) for b in blocks]
    structural = [k for k in kinds if k is not None]
    if not structural:
        what = "the file is empty" if not text.strip() else "no data block with a unit cell or atom sites"
        _problem(errors, path, what, "no_structure")
        return
    index = 0
    for block, kind in zip(blocks, kinds):
        if kind is None:
            continue
        source = f"{path}:{block.name}" if len(structural) > 1 else str(path)
        name = path.stem if len(structural) == 1 else f"{path.stem}_{index}"
        index += 1
        if kind != "structure":
            _problem(errors, source, f"data block {block.name!r} has {_BLOCK_MESSAGES[kind]}", kind, path)
            continue
        try:
            atoms, reader = _block_atoms(block), "ase"
        except _Unusable as err:
            _problem(errors, source, f"data block {block.name!r}: {err}", err.reason, path)
            continue
        except Exception as first:
            try:
                (_, atoms), = _pymatgen_atoms(text, block.name)
                reader = "pymatgen"
            except Exception as second:
                _problem(errors, source, f"data block {block.name!r} cannot be interpreted (ase: {_describe(first)}; "
                                         f"pymatgen: {_describe(second)})", "unreadable", path)
                continue
        bounds = _bounds_problem(atoms)  # the full cell after merging, and pymatgen's structures
        if bounds:
            _problem(errors, source, f"data block {block.name!r}: {bounds}", "out_of_bounds", path)
            continue
        atoms.info.update(source=str(path), reader=reader, block=block.name)
        yield name, atoms


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


# -------------------------------------------------------------------------------------------------- noise model
@dataclass
class NoiseModel:
    """How the start cluster is made from the crystal cluster; seeded, and recorded in each cluster's
    ``info["noise"]``. The original COD-Cluster17 noise is unpublished; the presets (``NOISE_PRESETS``) are
    explicit.

    Every molecule keeps its shape and gets a Haar-random orientation about its centroid (``rotation="haar"``) or
    a random rotation of at most ``max_angle_deg`` (``"bounded"``); the central molecule is rotated too. Its
    centroid is placed by ``placement``:

    - ``"expand"`` (preset ``mild``): the crystal centroid moved away from the cluster centre by the factor
      ``expansion`` and jittered by isotropic Gaussian noise of ``jitter`` Å, so every molecule starts next to its
      target and keeps its index correspondence.
    - ``"random"`` (preset ``hard``): centroids drawn independently of the final cluster, uniformly in a sphere
      around the cluster centre holding the molecules at crystal density (volume = molecules × crystal volume per
      molecule × ``volume_factor``), no two closer than ``min_separation`` × (volume per molecule)^(1/3), and
      numbered by distance from the centre (molecule 0 central, as in the final cluster; with ``central`` it sits
      exactly at the centre and the others are placed around it). Only the molecule and the crystal's density
      are used: the start a user has when just the molecule is known.
    - ``"shell"`` (preset ``shell``): molecule 0 at the centre and the others on Thomson points of a sphere
      (``baselines.thomson_points``) in a Haar-random global orientation, at the mean distance from the centre
      that points uniform in the crystal-density ball have (3/4 of its radius), each site jittered by isotropic
      Gaussian noise of ``jitter`` Å, numbered at random: the data-free evenly spread shell as a source. It uses
      the same information as ``"random"``.
    """

    expansion: float = 1.25
    jitter: float = 0.5
    rotation: str = "haar"  # or "bounded"
    max_angle_deg: float = 180.0
    placement: str = "expand"  # or "random"
    volume_factor: float = 1.0
    min_separation: float = 0.7
    central: bool = False  # "random" placement: molecule 0 exactly at the centre (the role of the crystal's)
    name: str = "custom"  # the preset's name, recorded in the metadata

    def __post_init__(self):
        if self.rotation not in ("haar", "bounded"):
            raise ValueError(f"unknown rotation noise {self.rotation!r}; use 'haar' or 'bounded'")
        if self.placement not in ("expand", "random", "shell"):
            raise ValueError(f"unknown centroid placement {self.placement!r}; use 'expand', 'random' or 'shell'")
        if not (self.volume_factor > 0 and self.min_separation >= 0):
            raise ValueError("volume_factor must be > 0 and min_separation >= 0")

    def apply(self, positions: torch.Tensor, generator: torch.Generator,
              volume_per_molecule: float | None = None) -> torch.Tensor:
        """positions [M, P, 3] (final cluster) -> initial positions [M, P, 3]. ``volume_per_molecule`` (Å³, the
        crystal's cell volume / molecules per cell) sets the density of the "random" placement; without it the
        volume of the sphere enclosing the final centroids per molecule is used."""
        centroids = positions.mean(1)  # [M, 3]
        rot = self._rotations(positions.shape[0], positions.dtype, generator)  # [M, 3, 3]
        if self.placement == "expand":
            new_centroids = self._expanded(centroids, generator)
        elif self.placement == "shell":
            new_centroids = self._shell_placement(centroids, generator, volume_per_molecule)
        else:
            new_centroids = self._random_placement(centroids, generator, volume_per_molecule)
        return torch.einsum("mij,mpj->mpi", rot, positions - centroids[:, None]) + new_centroids[:, None]

    def _rotations(self, m: int, dtype, generator) -> torch.Tensor:
        from kflow.molecular.so3 import exp_map

        if self.rotation == "haar":
            return random_rotations(m, dtype=dtype, generator=generator)
        axis = torch.nn.functional.normalize(torch.randn(m, 3, generator=generator, dtype=dtype), dim=-1)
        angle = torch.rand(m, 1, generator=generator, dtype=dtype) * np.deg2rad(self.max_angle_deg)
        return exp_map(axis * angle)

    def _expanded(self, centroids: torch.Tensor, generator) -> torch.Tensor:
        centre = centroids.mean(0)
        jitter = torch.randn(centroids.shape, generator=generator, dtype=centroids.dtype)
        return centre + self.expansion * (centroids - centre) + self.jitter * jitter

    def _ball_radius(self, centroids: torch.Tensor, volume_per_molecule) -> float:
        """Radius of the ball holding the M molecules at crystal density (× ``volume_factor``), Å."""
        m = centroids.shape[0]
        if volume_per_molecule is None:
            volume_per_molecule = 4 / 3 * np.pi * float((centroids - centroids.mean(0)).norm(dim=1).max()) ** 3 / m
        return (3 * m * volume_per_molecule * self.volume_factor / (4 * np.pi)) ** (1 / 3)

    def _shell_placement(self, centroids: torch.Tensor, generator, volume_per_molecule) -> torch.Tensor:
        from kflow.molecular.baselines import thomson_points

        m, dtype = centroids.shape[0], centroids.dtype
        radius = 0.75 * self._ball_radius(centroids, volume_per_molecule)
        turn = random_rotations(1, dtype=dtype, generator=generator)[0]
        sites = radius * thomson_points(m - 1, dtype=dtype) @ turn.T  # [M - 1, 3]
        sites = sites + self.jitter * torch.randn(sites.shape, generator=generator, dtype=dtype)
        sites = sites[torch.randperm(m - 1, generator=generator)]  # the numbering says nothing
        return torch.cat([torch.zeros(1, 3, dtype=dtype), sites]) + centroids.mean(0)

    def _random_placement(self, centroids: torch.Tensor, generator, volume_per_molecule) -> torch.Tensor:
        m, dtype = centroids.shape[0], centroids.dtype
        centre = centroids.mean(0)
        if volume_per_molecule is None:
            volume_per_molecule = 4 / 3 * np.pi * float((centroids - centre).norm(dim=1).max()) ** 3 / m
        radius = self._ball_radius(centroids, volume_per_molecule)
        min_distance = self.min_separation * volume_per_molecule ** (1 / 3)
        placed = torch.zeros(1 if self.central else 0, 3, dtype=dtype)  # central: molecule 0 at the centre
        for _ in range(len(placed), m):  # sequential random addition: 64 uniform candidates, first far enough
            direction = torch.nn.functional.normalize(torch.randn(64, 3, generator=generator, dtype=dtype), dim=-1)
            candidates = direction * radius * torch.rand(64, 1, generator=generator, dtype=dtype) ** (1 / 3)
            gap = torch.cdist(candidates, placed).amin(1) if len(placed) else torch.full((64,), np.inf, dtype=dtype)
            ok = torch.nonzero(gap >= min_distance)
            pick = int(ok[0]) if len(ok) else int(gap.argmax())  # too crowded: the roomiest candidate
            placed = torch.cat([placed, candidates[pick:pick + 1]])
        placed = placed[torch.argsort(placed.norm(dim=1), stable=True)]  # molecule 0 nearest the centre
        return placed + centre if self.central else placed - placed.mean(0) + centre


NOISE_PRESETS = {
    "mild": NoiseModel(name="mild"),
    # Molecule 0 exactly at the centre: the start has a central molecule with the role of the crystal's (paired
    # with it by the coupling, marked for the network), the same in training, the study and ``kflow assemble``.
    "hard": NoiseModel(placement="random", central=True, name="hard"),
    # The evenly spread shell as a source: the same information as "hard" (molecule + density), less entropy.
    "shell": NoiseModel(placement="shell", central=True, name="shell"),
}


def noise_model(noise: "str | NoiseModel | None" = None) -> NoiseModel:
    """A ``NoiseModel`` from a preset name ("mild", "hard"), a model (returned as is) or None ("mild")."""
    if noise is None:
        return NOISE_PRESETS["mild"]
    if isinstance(noise, NoiseModel):
        return noise
    if noise not in NOISE_PRESETS:
        raise ValueError(f"unknown start preset {noise!r}; choose one of {sorted(NOISE_PRESETS)}")
    return NOISE_PRESETS[noise]


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
    final = torch.from_numpy(_neighbour_copies(mols, num_neighbors)).double()  # [M, P, 3]
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
