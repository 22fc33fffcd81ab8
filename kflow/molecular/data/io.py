"""COD-Cluster17 raw format (CSV) and export for molecular viewers.

Raw layout (as published with CrystalFlow/AssembleFlow):
    <root>/raw/FinalPositions/<id>_cluster16.csv
    <root>/raw/InitialPositions/<id>_cluster16_noised.csv
Each file: one header line, then ``mol_idx,atom_type,x,y,z`` per atom (element symbol, Cartesian Å).
"""
from __future__ import annotations

import os
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from ase.data import atomic_numbers as ASE_ATOMIC_NUMBERS
from ase.data import chemical_symbols

from kflow.molecular.data.cluster import NUM_MOLECULES, Cluster, InvalidCluster
from kflow.molecular.geometry import pad_by_index, rigid_residuals
from kflow.utils.io import atomic_path, printable_name, safe_filename

__all__ = ["read_cluster_csv", "read_cod_cluster17", "read_cod_cluster17_record",
           "write_cod_cluster17", "cod_cluster17_paths", "export_cluster", "cluster_pdb_text", "intramolecular_bonds",
           "check_rigid_consistency",
           "record_residuals"]

FINAL_DIR, INITIAL_DIR = "FinalPositions", "InitialPositions"
BOND_FACTOR = 1.2  # covalent-radius multiplier for bonds, as crystals.find_molecules and assemble use
# Element symbols as written (C, Cl) plus upper/lower-case variants seen in converted files (CL, cl).
_SYMBOLS = {v: z for s, z in ASE_ATOMIC_NUMBERS.items() if z > 0 for v in (s, s.upper(), s.lower())}


def cod_cluster17_paths(root: str | os.PathLike, cluster_id: str) -> tuple[Path, Path]:
    """(initial_csv, final_csv) of ``cluster_id`` under ``root`` (the folder that contains ``raw/``). The id is
    made file-name safe (it may come from a crystal name in an input file), so both paths stay inside ``root``."""
    raw = Path(root) / "raw"
    cluster_id = safe_filename(cluster_id)
    return raw / INITIAL_DIR / f"{cluster_id}_cluster16_noised.csv", raw / FINAL_DIR / f"{cluster_id}_cluster16.csv"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="strict")
    except FileNotFoundError:
        raise InvalidCluster("missing_file", f"{path} does not exist") from None
    except UnicodeDecodeError as err:
        raise InvalidCluster("malformed", f"{path}: not a UTF-8 text file ({err})") from None


def _split_fields(path: Path) -> tuple[list[str], int]:
    """All fields of the atom lines of a raw CSV (one flat list, 5 per atom) and the number of atom lines."""
    text = _read_text(path)
    newline = text.find("\n")
    body = text[newline + 1:].replace("\r", "").strip() if newline >= 0 else ""
    if not body:
        raise InvalidCluster("malformed", f"{path}: expected a header line and at least one atom line")
    n = body.count("\n") + 1
    fields = body.replace("\n", ",").split(",")
    if len(fields) != 5 * n:
        lines = body.split("\n")
        bad = next(i for i, ln in enumerate(lines) if ln.count(",") != 4)
        raise InvalidCluster("malformed", f"{path}, line {bad + 2}: expected 5 columns mol_idx,atom_type,x,y,z, "
                             f"got {lines[bad].count(',') + 1}: {lines[bad]!r}")
    return fields, n


def _line(fields: list[str], i: int) -> str:
    return ",".join(fields[5 * i: 5 * i + 5])


def _parse_columns(path: Path, fields: list[str], n: int, labels: bool = True):
    """Fields -> (mol_idx [N] int64, atomic_numbers [N] int64, positions [N, 3] float64), converted column-wise;
    the offending line is searched for only on the error path. ``labels=False`` parses positions only (mol_idx and
    atomic_numbers are then None)."""
    try:
        columns = [fields[0::5]] if labels else []
        values = np.array(columns + [fields[2::5], fields[3::5], fields[4::5]], dtype=np.float64)  # [4 or 3, N]
    except ValueError:
        for i in range(n):
            try:
                float(fields[5 * i]), float(fields[5 * i + 2]), float(fields[5 * i + 3]), float(fields[5 * i + 4])
            except ValueError:
                raise InvalidCluster("malformed", f"{path}, line {i + 2}: non-numeric value in "
                                     f"{_line(fields, i)!r}") from None
        raise
    if not np.isfinite(values).all():
        i = int(np.nonzero(~np.isfinite(values).all(0))[0][0])
        raise InvalidCluster("nan", f"{path}, line {i + 2}: non-finite value in {_line(fields, i)!r}")
    if not labels:
        return None, None, values.T
    mol, xyz = values[0], values[1:].T
    if (mol != np.round(mol)).any() or (mol < 0).any():
        i = int(np.nonzero((mol != np.round(mol)) | (mol < 0))[0][0])
        raise InvalidCluster("malformed", f"{path}, line {i + 2}: mol_idx must be a non-negative integer")
    z = _atomic_numbers(path, fields[1::5])
    return mol.astype(np.int64), z, xyz


def _atomic_numbers(path: Path, symbols: list[str]) -> np.ndarray:
    z = np.fromiter(map(_SYMBOLS.get, symbols, repeat(0)), dtype=np.int64, count=len(symbols))
    if (z == 0).any():  # second chance for padded symbols (" C")
        z = np.fromiter((_SYMBOLS.get(s.strip(), 0) for s in symbols), dtype=np.int64, count=len(symbols))
    if (z == 0).any():
        i = int(np.nonzero(z == 0)[0][0])
        raise InvalidCluster("unknown_element", f"{path}, line {i + 2}: unknown element {symbols[i]!r}")
    return z


def read_cluster_csv(path: str | os.PathLike):
    """Parse one raw CSV -> (mol_idx [N] int64, atomic_numbers [N] int64, positions [N, 3] float64).

    Raises ``InvalidCluster`` naming the file and line for a missing file, wrong column count, unknown element,
    non-numeric or non-finite values.
    """
    path = Path(path)
    fields, n = _split_fields(path)
    return _parse_columns(path, fields, n)


def read_cod_cluster17_record(initial_csv: str | os.PathLike, final_csv: str | os.PathLike, name: str,
                              num_molecules: int | None = NUM_MOLECULES) -> dict:
    """Parse and validate one CSV pair into a ``Cluster.to_numpy()`` record (no torch; used by the workers).

    Both files must list the same atoms (mol_idx and element) in the same order. Molecule ids are re-labelled
    0..M-1 by sorting the file's ``mol_idx`` values (the central molecule keeps index 0); atoms keep file order
    within each molecule.
    """
    initial_csv, final_csv = Path(initial_csv), Path(final_csv)
    fields_f, n_f = _split_fields(final_csv)
    fields_i, n_i = _split_fields(initial_csv)
    if n_i != n_f:
        raise InvalidCluster("atom_count_mismatch", f"{initial_csv} has {n_i} atoms but {final_csv} has {n_f}")
    mol, z, x_f = _parse_columns(final_csv, fields_f, n_f)
    if fields_i[0::5] == fields_f[0::5] and fields_i[1::5] == fields_f[1::5]:  # the common case: text-identical
        _, _, x_i = _parse_columns(initial_csv, fields_i, n_i, labels=False)
    else:
        mol_i, z_i, x_i = _parse_columns(initial_csv, fields_i, n_i)
        if (z_i != z).any() or (mol_i != mol).any():
            i = int(np.nonzero((z_i != z) | (mol_i != mol))[0][0])
            raise InvalidCluster("atom_order_mismatch", f"{initial_csv} and {final_csv} disagree at atom line "
                                 f"{i + 2} (mol_idx/element differ)")
    ids, mol = np.unique(mol, return_inverse=True)
    counts = np.bincount(mol)
    where = f"cluster {name!r} ({final_csv})"
    if num_molecules is not None and len(ids) != num_molecules:
        raise InvalidCluster("molecule_count", f"{where} has {len(ids)} molecules, expected {num_molecules}")
    if (counts != counts[0]).any():
        raise InvalidCluster("atom_count_mismatch", f"{where}: molecules have different atom counts "
                             f"{counts.tolist()}")
    order = np.argsort(mol, kind="stable")  # atoms of a molecule contiguous
    zz = z[order].reshape(len(ids), -1)
    if (zz != zz[0]).any():
        m = int(np.nonzero((zz != zz[0]).any(1))[0][0])
        raise InvalidCluster("composition_mismatch", f"{where}: molecule {m} lists different elements (or a "
                             f"different atom order) than molecule 0")
    return {"atomic_numbers": z[order].astype(np.uint8), "molecule_index": mol[order].astype(np.uint8),
            "initial_positions": x_i[order].astype(np.float32), "final_positions": x_f[order].astype(np.float32),
            "name": name, "crystal": name}


def record_residuals(records: list[dict]) -> list[np.ndarray]:
    """Rigid residual [M] per cluster for many records (equal-size molecules within each cluster). Clusters
    with the same molecule size are stacked and checked in one batched SVD (no padding)."""
    shapes = [(int(r["molecule_index"][-1]) + 1, len(r["molecule_index"])) for r in records]
    out: list = [None] * len(records)
    groups: dict[int, list[int]] = {}
    for k, (m, n) in enumerate(shapes):
        groups.setdefault(n // m, []).append(k)
    for p, members in groups.items():  # a loop over distinct molecule sizes; molecules and atoms are batched
        x0 = np.concatenate([records[k]["initial_positions"].reshape(-1, p, 3) for k in members]).astype(np.float64)
        x1 = np.concatenate([records[k]["final_positions"].reshape(-1, p, 3) for k in members]).astype(np.float64)
        residual = rigid_residuals(torch.from_numpy(x0), torch.from_numpy(x1)).numpy()  # [sum of M]
        for k, part in zip(members, np.split(residual, np.cumsum([shapes[k][0] for k in members])[:-1])):
            out[k] = part
    return out


def check_rigid_consistency(cluster: Cluster, tolerance: float = 1e-3) -> torch.Tensor:
    """Fit each molecule's final atoms as a rigid motion of its initial atoms; return the RMS residual [M] (Å).

    Raises ``InvalidCluster('not_rigid')`` naming the molecule when a residual exceeds ``tolerance`` Å.
    """
    initial, mask, _ = pad_by_index(cluster.initial_positions.double(), cluster.molecule_index)
    final, _, _ = pad_by_index(cluster.final_positions.double(), cluster.molecule_index)
    residual = rigid_residuals(initial, final, mask)  # [M]
    _raise_if_not_rigid(cluster.name, residual.numpy(), tolerance)
    return residual


def _raise_if_not_rigid(name: str, residual: np.ndarray, tolerance: float):
    if (residual > tolerance).any():
        m = int(residual.argmax())
        raise InvalidCluster("not_rigid", f"cluster {name!r}, molecule {m}: initial and final atoms differ "
                             f"by more than a rigid motion (RMS residual {residual[m]:.3g} Å > {tolerance} Å)")


def read_cod_cluster17(initial_csv: str | os.PathLike, final_csv: str | os.PathLike, name: str | None = None,
                       num_molecules: int | None = NUM_MOLECULES, rigid_tolerance: float | None = 1e-3) -> Cluster:
    """Read one COD-Cluster17 sample from its initial and final CSV files into a validated ``Cluster``.

    Checks: columns, elements, finite values, same atoms in both files, ``num_molecules`` molecules of equal
    composition, and (unless ``rigid_tolerance`` is None) that every molecule moves rigidly between the two
    arrangements (RMS residual < ``rigid_tolerance`` Å). Raises ``InvalidCluster`` with a reason and the file.
    """
    name = name or Path(final_csv).name.replace("_cluster16.csv", "")
    cluster = Cluster.from_numpy(read_cod_cluster17_record(initial_csv, final_csv, name, num_molecules))
    cluster.validate(num_molecules)
    if rigid_tolerance is not None:
        check_rigid_consistency(cluster, rigid_tolerance)
    return cluster


def _csv_text(cluster: Cluster, positions: torch.Tensor) -> str:
    lines = ["mol_idx,atom_type,x,y,z"]
    syms = [chemical_symbols[int(z)] for z in cluster.atomic_numbers]
    pos = positions.double().numpy()
    mol = cluster.molecule_index.numpy()
    lines += [f"{m},{s},{x:.6f},{y:.6f},{zz:.6f}" for m, s, (x, y, zz) in zip(mol, syms, pos)]
    return "\n".join(lines) + "\n"


def write_cod_cluster17(cluster: Cluster, root: str | os.PathLike, cluster_id: str | None = None) -> tuple[Path, Path]:
    """Write ``cluster`` in the raw COD-Cluster17 layout under ``root/raw``; both files are written atomically."""
    cluster_id = cluster_id or cluster.name
    initial, final = cod_cluster17_paths(root, cluster_id)
    for path, pos in ((initial, cluster.initial_positions), (final, cluster.final_positions)):
        with atomic_path(path) as tmp:
            tmp.write_text(_csv_text(cluster, pos), encoding="utf-8")
    return initial, final


def intramolecular_bonds(atomic_numbers: torch.Tensor, molecule_index: torch.Tensor, positions: torch.Tensor,
                         bond_factor: float = BOND_FACTOR) -> np.ndarray:
    """Covalent bonds [E, 2] (i < j, atom indices) within each molecule: d < bond_factor × (r_cov,i + r_cov,j).

    Pairs of different molecules are never bonds, however close: a viewer must draw molecules, not clashes.
    """
    from ase.data import covalent_radii

    n = int(atomic_numbers.numel())
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    # Pad atoms to [M, P] per molecule, so the distances are one [M, P, P] block per molecule, never [N, N].
    atom, mask, _ = pad_by_index(torch.arange(n), molecule_index, fill=-1)
    pos, _, _ = pad_by_index(positions.detach().double().cpu(), molecule_index)
    radii, _, _ = pad_by_index(torch.from_numpy(covalent_radii * bond_factor)[atomic_numbers.long()], molecule_index)
    close = torch.cdist(pos, pos) < radii[:, :, None] + radii[:, None, :]
    close &= mask[:, :, None] & mask[:, None, :]
    m, a, b = torch.nonzero(torch.triu(close, diagonal=1), as_tuple=True)
    pairs = torch.stack([atom[m, a], atom[m, b]], 1)
    return np.sort(pairs.numpy(), axis=1)


def _conect_lines(bonds: np.ndarray, serials: np.ndarray) -> list[str]:
    """CONECT records listing every bond from both atoms (as the PDB format does), at most 4 partners a line."""
    both = np.concatenate([bonds, bonds[:, ::-1]])
    both = both[np.lexsort((both[:, 1], both[:, 0]))]
    owners, starts = np.unique(both[:, 0], return_index=True)
    lines = []
    for owner, partners in zip(owners, np.split(both[:, 1], starts[1:])):
        for k in range(0, len(partners), 4):
            lines.append(f"CONECT{serials[owner]:5d}" + "".join(f"{serials[p]:5d}" for p in partners[k:k + 4]))
    return lines


def cluster_pdb_text(cluster: Cluster, positions: torch.Tensor, title: str = "") -> str:
    """PDB text of ``positions`` [N, 3] Å: one residue (MOL, numbered 1..M) and one chain (A, B, ...) per molecule,
    atoms named element + count, so viewers colour and select molecules one by one; CONECT records give the
    covalent bonds within each molecule (``intramolecular_bonds``), so viewers do not guess bonds across the close
    contacts between molecules."""
    chains = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    title = "".join(c if c.isprintable() else " " for c in title)  # a name from a file must not add records
    lines = [f"REMARK   1 {title}"[:80]]
    counts: dict = {}
    for serial, (zz, m, (x, y, w)) in enumerate(zip(cluster.atomic_numbers.tolist(), cluster.molecule_index.tolist(),
                                                     positions.double().tolist()), 1):
        symbol = chemical_symbols[zz]
        counts[(m, symbol)] = counts.get((m, symbol), 0) + 1
        name = f"{symbol}{counts[(m, symbol)]}"[:4]
        name = f" {name:<3}" if len(symbol) == 1 and len(name) < 4 else f"{name:<4}"
        lines.append(f"HETATM{serial % 100000:5d} {name} MOL {chains[m % len(chains)]}{m + 1:4d}    "
                     f"{x:8.3f}{y:8.3f}{w:8.3f}  1.00  0.00          {symbol.upper():>2}")
    if cluster.num_atoms < 100000:  # serials wrap above 99999, and a CONECT to a wrapped serial would be wrong
        bonds = intramolecular_bonds(cluster.atomic_numbers, cluster.molecule_index, positions)
        lines += _conect_lines(bonds, np.arange(1, cluster.num_atoms + 1))
    lines += ["END", ""]
    return "\n".join(lines)


def export_cluster(cluster: Cluster, path: str | os.PathLike, which: str = "final",
                   positions: torch.Tensor | None = None, format: str | None = None) -> Path:
    """Write the initial, final or a predicted arrangement for a molecular viewer (xyz, extxyz, pdb, ... via ase).

    Args:
        which: "initial", "final" or "predicted" (then ``positions`` [N, 3] must be given).
        format: any ase.io format; default from the file suffix. Molecule ids go to the ``mol_idx`` array
            (extxyz) or one chain and residue per molecule (pdb, ``cluster_pdb_text``).
    """
    import ase
    import ase.io

    if which == "predicted":
        if positions is None or tuple(positions.shape) != (cluster.num_atoms, 3):
            raise ValueError(f"export_cluster(which='predicted') needs positions of shape [{cluster.num_atoms}, 3]")
        pos = positions
    elif which in ("initial", "final"):
        pos = getattr(cluster, f"{which}_positions")
    else:
        raise ValueError(f"which must be 'initial', 'final' or 'predicted', got {which!r}")
    path = Path(path)
    fmt = format or {"xyz": "extxyz"}.get(path.suffix.lstrip("."), None)
    if fmt == "proteindatabank" or (fmt is None and path.suffix == ".pdb"):
        with atomic_path(path) as tmp:  # our writer: one chain per molecule (ase's has residues only)
            tmp.write_text(cluster_pdb_text(cluster, pos, f"{cluster.name}: {which} arrangement"))
        return path
    atoms = ase.Atoms(numbers=cluster.atomic_numbers.numpy(), positions=pos.double().detach().cpu().numpy())
    atoms.set_array("mol_idx", cluster.molecule_index.numpy().astype(np.int64))
    atoms.info["name"] = printable_name(cluster.name)  # a newline or backslash would break the comment line
    atoms.info["arrangement"] = which
    with atomic_path(path) as tmp:
        ase.io.write(tmp, atoms, format=fmt or "extxyz")
    return path
