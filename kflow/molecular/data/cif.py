"""CIF files block by block (``read_cif``): ASE's CIF parser with kflow's symmetry expansion, pymatgen's
``CifParser`` as the second reader.
"""
from __future__ import annotations

import functools
import io
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np


if TYPE_CHECKING:  # ase is imported lazily at run time
    from ase import Atoms
from kflow.molecular.data.bounds import (MAX_CELL_ATOMS, Unusable, bounds_problem, cell_problem, describe_error,
                                         note_problem)


__all__ = ["read_cif", "cif_number", "DUPLICATE_TOLERANCE"]


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
        raise Unusable("out_of_bounds", bounds)
    labels = _column(block, "_atom_site_label", n) or [f"site{i + 1}" for i in range(n)]
    symbols = _column(block, "_atom_site_type_symbol", n)
    numbers = np.array([_element_number(s, symbols is not None) for s in (symbols or labels)], dtype=np.int64)
    coords = np.array([[cif_number(v) if cif_number(v) is not None else np.nan for v in col] for col in raw]).T
    if np.isnan(coords).any():
        i = int(np.nonzero(np.isnan(coords).any(1))[0][0])
        raise Unusable("missing_coordinates", f"atom site {labels[i]} has no coordinates ('?' or '.')")
    occupancy = np.array([cif_number(v, 1.0) for v in (_column(block, "_atom_site_occupancy", n) or [1.0] * n)])
    flags = _column(block, "_atom_site_calc_flag", n)
    keep = np.ones(n, dtype=bool) if flags is None else np.array([str(f).lower() != "dum" for f in flags])
    frac = coords if fract else coords @ np.linalg.inv(cell)
    frac, numbers, occupancy, site = frac[keep], numbers[keep], occupancy[keep], np.arange(n)[keep]
    rot, trans, how = _symmetry_operations(block)
    k = len(rot)
    if n * k > MAX_CELL_ATOMS:
        raise Unusable("out_of_bounds", f"{n} sites x {k} symmetry operations: more than {MAX_CELL_ATOMS} atoms")
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
        note_problem(errors, path, f"cannot be read ({describe_error(err)})")
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
            note_problem(errors, path, f"cannot be parsed as CIF (ase: {describe_error(ase_error)}; pymatgen: "
                                   f"{describe_error(err)})")
            return
        for i, (block_name, atoms) in enumerate(found):
            bounds = bounds_problem(atoms)
            if bounds:
                note_problem(errors, f"{path}:{block_name}", f"data block {block_name!r}: {bounds}", "out_of_bounds",
                             path)
                continue
            atoms.info.update(source=str(path), reader="pymatgen", block=block_name)
            yield (path.stem if len(found) == 1 else f"{path.stem}_{i}"), atoms
        return
    kinds = [_classify_block(b) for b in blocks]
    structural = [k for k in kinds if k is not None]
    if not structural:
        what = "the file is empty" if not text.strip() else "no data block with a unit cell or atom sites"
        note_problem(errors, path, what, "no_structure")
        return
    index = 0
    for block, kind in zip(blocks, kinds):
        if kind is None:
            continue
        source = f"{path}:{block.name}" if len(structural) > 1 else str(path)
        name = path.stem if len(structural) == 1 else f"{path.stem}_{index}"
        index += 1
        if kind != "structure":
            note_problem(errors, source, f"data block {block.name!r} has {_BLOCK_MESSAGES[kind]}", kind, path)
            continue
        try:
            atoms, reader = _block_atoms(block), "ase"
        except Unusable as err:
            note_problem(errors, source, f"data block {block.name!r}: {err}", err.reason, path)
            continue
        except Exception as first:
            try:
                (_, atoms), = _pymatgen_atoms(text, block.name)
                reader = "pymatgen"
            except Exception as second:
                note_problem(errors, source, f"data block {block.name!r} cannot be interpreted (ase: "
                             f"{describe_error(first)}; pymatgen: {describe_error(second)})", "unreadable", path)
                continue
        bounds = bounds_problem(atoms)  # the full cell after merging, and pymatgen's structures
        if bounds:
            note_problem(errors, source, f"data block {block.name!r}: {bounds}", "out_of_bounds", path)
            continue
        atoms.info.update(source=str(path), reader=reader, block=block.name)
        yield name, atoms
