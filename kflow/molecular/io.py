"""COD-Cluster17 raw format (CSV) and export for molecular viewers.

Raw layout (as published with CrystalFlow/AssembleFlow):
    <root>/raw/FinalPositions/<id>_cluster16.csv
    <root>/raw/InitialPositions/<id>_cluster16_noised.csv
Each file: one header line, then ``mol_idx,atom_type,x,y,z`` per atom (element symbol, Cartesian Å).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from ase.data import atomic_numbers as ASE_ATOMIC_NUMBERS
from ase.data import chemical_symbols

from kflow.molecular.cluster import NUM_MOLECULES, Cluster, InvalidCluster
from kflow.molecular.frames import fit_rigid_motion, rigid_frames
from kflow.utils.io import atomic_path

__all__ = ["read_cluster_csv", "rigid_residuals", "read_cod_cluster17", "write_cod_cluster17", "cod_cluster17_paths",
           "export_cluster", "check_rigid_consistency"]

FINAL_DIR, INITIAL_DIR = "FinalPositions", "InitialPositions"
_SYMBOLS = {s.lower(): z for s, z in ASE_ATOMIC_NUMBERS.items()}


def cod_cluster17_paths(root: str | os.PathLike, cluster_id: str) -> tuple[Path, Path]:
    """(initial_csv, final_csv) of ``cluster_id`` under ``root`` (the folder that contains ``raw/``)."""
    raw = Path(root) / "raw"
    return raw / INITIAL_DIR / f"{cluster_id}_cluster16_noised.csv", raw / FINAL_DIR / f"{cluster_id}_cluster16.csv"


def read_cluster_csv(path: str | os.PathLike):
    """Parse one raw CSV -> (mol_idx [N] int64, atomic_numbers [N] int64, positions [N, 3] float64).

    The file is split into fields in one pass and converted column-wise (no per-line Python loop on the normal
    path). Raises ``InvalidCluster`` naming the file and line for a missing file, wrong column count, unknown
    element, non-numeric or non-finite values.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except FileNotFoundError:
        raise InvalidCluster("missing_file", f"{path} does not exist") from None
    except UnicodeDecodeError as err:
        raise InvalidCluster("malformed", f"{path}: not a UTF-8 text file ({err})") from None
    newline = text.find("\n")
    body = text[newline + 1:].strip() if newline >= 0 else ""
    if not body:
        raise InvalidCluster("malformed", f"{path}: expected a header line and at least one atom line")
    lines = body.splitlines()
    fields = body.replace("\r", "").replace("\n", ",").split(",")
    if len(fields) != 5 * len(lines):
        bad = next(i for i, ln in enumerate(lines) if ln.count(",") != 4)
        raise InvalidCluster("malformed", f"{path}, line {bad + 2}: expected 5 columns mol_idx,atom_type,x,y,z, "
                             f"got {lines[bad].count(',') + 1}: {lines[bad]!r}")
    try:
        mol = np.array(fields[0::5], dtype=np.float64)
        xyz = np.array([fields[2::5], fields[3::5], fields[4::5]], dtype=np.float64).T
    except ValueError:
        for i, ln in enumerate(lines):  # locate the offending line only on the error path
            r = ln.split(",")
            try:
                float(r[0]), float(r[2]), float(r[3]), float(r[4])
            except ValueError:
                raise InvalidCluster("malformed", f"{path}, line {i + 2}: non-numeric value in {ln!r}") from None
        raise
    if (mol != np.round(mol)).any() or (mol < 0).any():
        i = int(np.nonzero((mol != np.round(mol)) | (mol < 0))[0][0])
        raise InvalidCluster("malformed", f"{path}, line {i + 2}: mol_idx must be a non-negative integer")
    if not np.isfinite(xyz).all():
        i = int(np.nonzero(~np.isfinite(xyz).all(1))[0][0])
        raise InvalidCluster("nan", f"{path}, line {i + 2}: non-finite coordinate in {lines[i]!r}")
    symbols, inverse = np.unique(np.array(fields[1::5]), return_inverse=True)
    table = np.array([_SYMBOLS.get(s.strip().lower(), 0) for s in symbols], dtype=np.int64)
    z = table[inverse]
    if (z == 0).any():
        i = int(np.nonzero(z == 0)[0][0])
        raise InvalidCluster("unknown_element", f"{path}, line {i + 2}: unknown element {fields[5 * i + 1]!r}")
    return mol.astype(np.int64), z, xyz


def rigid_residuals(initial: torch.Tensor, final: torch.Tensor, molecule_index: torch.Tensor) -> torch.Tensor:
    """RMS residual [M] (Å) of the best rigid motion taking each molecule's initial atoms onto its final atoms.

    ``molecule_index`` may be global over several concatenated clusters, so many clusters are checked in one
    batched Kabsch call.
    """
    _, _, body = rigid_frames(initial.double(), molecule_index)
    return fit_rigid_motion(body, final.double(), molecule_index)[2]


def check_rigid_consistency(cluster: Cluster, tolerance: float = 1e-3) -> torch.Tensor:
    """Fit each molecule's final atoms as a rigid motion of its initial atoms; return the RMS residual [M] (Å).

    Raises ``InvalidCluster('not_rigid')`` naming the molecule when a residual exceeds ``tolerance`` Å.
    """
    residual = rigid_residuals(cluster.initial_positions, cluster.final_positions, cluster.molecule_index)
    if (residual > tolerance).any():
        m = int(residual.argmax())
        raise InvalidCluster("not_rigid", f"cluster {cluster.name!r}, molecule {m}: initial and final atoms differ "
                             f"by more than a rigid motion (RMS residual {residual[m]:.3g} Å > {tolerance} Å)")
    return residual


def read_cod_cluster17(initial_csv: str | os.PathLike, final_csv: str | os.PathLike, name: str | None = None,
                       num_molecules: int | None = NUM_MOLECULES, rigid_tolerance: float | None = 1e-3) -> Cluster:
    """Read one COD-Cluster17 sample from its initial and final CSV files into a validated ``Cluster``.

    Molecule ids are re-labelled 0..M-1 by sorting the file's ``mol_idx`` values, so the central molecule keeps
    index 0. Atoms are kept in file order within each molecule.
    """
    mol_i, z_i, x_i = read_cluster_csv(initial_csv)
    mol_f, z_f, x_f = read_cluster_csv(final_csv)
    name = name or Path(final_csv).name.replace("_cluster16.csv", "")
    if len(z_i) != len(z_f):
        raise InvalidCluster("atom_count_mismatch", f"{initial_csv} has {len(z_i)} atoms but {final_csv} has "
                             f"{len(z_f)}")
    if (z_i != z_f).any() or (mol_i != mol_f).any():
        i = int(np.nonzero((z_i != z_f) | (mol_i != mol_f))[0][0])
        raise InvalidCluster("atom_order_mismatch", f"{initial_csv} and {final_csv} disagree at atom line {i + 2} "
                             f"(mol_idx/element differ)")
    ids, mol = np.unique(mol_f, return_inverse=True)
    order = np.argsort(mol, kind="stable")  # atoms of a molecule contiguous
    cluster = Cluster(torch.from_numpy(z_f[order]), torch.from_numpy(mol[order]),
                      torch.from_numpy(x_i[order]).float(), torch.from_numpy(x_f[order]).float(), name, name)
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


def export_cluster(cluster: Cluster, path: str | os.PathLike, which: str = "final",
                   positions: torch.Tensor | None = None, format: str | None = None) -> Path:
    """Write the initial, final or a predicted arrangement for a molecular viewer (xyz, extxyz, pdb, ... via ase).

    Args:
        which: "initial", "final" or "predicted" (then ``positions`` [N, 3] must be given).
        format: any ase.io format; default from the file suffix. Molecule ids go to the ``mol_idx`` array
            (extxyz) or residue numbers (pdb).
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
    atoms = ase.Atoms(numbers=cluster.atomic_numbers.numpy(), positions=pos.double().detach().cpu().numpy())
    atoms.set_array("mol_idx", cluster.molecule_index.numpy().astype(np.int64))
    atoms.info["name"] = cluster.name
    atoms.info["arrangement"] = which
    path = Path(path)
    fmt = format or {"xyz": "extxyz"}.get(path.suffix.lstrip("."), None)
    if (fmt or path.suffix.lstrip(".")) == "proteindatabank" or path.suffix == ".pdb":
        atoms.set_array("residuenumbers", cluster.molecule_index.numpy().astype(np.int64) + 1)
        fmt = "proteindatabank"
    with atomic_path(path) as tmp:
        ase.io.write(tmp, atoms, format=fmt or "extxyz")
    return path
