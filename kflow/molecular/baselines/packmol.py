"""PackMol baseline for molecular assembly: run the real ``packmol`` binary to pack rigid copies of one molecule
without overlap in a sphere, and turn its output into cluster predictions that ``evaluate_assembly`` scores.

PackMol (Martínez et al., J. Comput. Chem. 30, 2157, 2009) is the classical packer that COD-Cluster17 papers
report as a baseline. Nothing here re-implements it: the molecule and an input deck are written to a temporary
folder, the binary reads the deck on stdin, and its output file is parsed and checked (N rigid copies of the
molecule, atom order kept) before anything is returned.

The binary is found by ``find_packmol``: an explicit path, else ``$KFLOW_PACKMOL``, else the executable shipped
inside the PyPI wheel ``packmol`` (``<site-packages>/packmol/binaries/packmol``), else ``packmol`` on PATH.
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["pack_cluster", "packmol_predictions", "find_packmol", "cluster_packing_volume", "sphere_radius",
           "PackmolError", "PackmolNotFoundError", "DEFAULT_TOLERANCE", "IMPERFECT_PACKING_EXIT"]

DEFAULT_TOLERANCE = 2.0  # Å, PackMol's customary minimum intermolecular atom distance
IMPERFECT_PACKING_EXIT = 173  # PackMol's exit status when it ends without a packing that meets every constraint
RIGID_ATOL = 1e-3  # Å: largest change of an intramolecular distance accepted in PackMol's output
AVOGADRO = 6.02214076e23
A3_PER_CM3 = 1e24
_OUTPUT_TAIL_CHARS = 2000

INSTALL_HINT = ("Install it with `pip install packmol` (a PyPI wheel that ships the compiled binary; "
                "`pip install -e .` pulls it in) or `apt-get install packmol`, or point to an executable with "
                "`binary=...` or the KFLOW_PACKMOL environment variable.")


class PackmolNotFoundError(FileNotFoundError):
    """No PackMol executable was found (or the one named does not exist / is not executable)."""


class PackmolError(RuntimeError):
    """A PackMol run failed: non-zero exit, timeout, unusable output; the message names the cause and ends with
    the tail of PackMol's output."""


# ----------------------------------------------------------------------------------------------- binary lookup
def _wheel_binary() -> Path | None:
    """The executable inside the PyPI wheel ``packmol`` (package folder ``packmol/binaries/``), without importing
    the package; None when the wheel is not installed or holds no binary."""
    try:
        spec = importlib.util.find_spec("packmol")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    names = ("packmol.exe", "packmol") if os.name == "nt" else ("packmol",)
    for location in spec.submodule_search_locations:
        for name in names:
            candidate = Path(location) / "binaries" / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    return None


def _executable(path: str | os.PathLike, origin: str) -> Path:
    """``path`` as an executable file; a bare name is looked up on PATH. Raises PackmolNotFoundError."""
    text = os.fspath(path)
    if os.sep not in text and (os.altsep is None or os.altsep not in text):
        found = shutil.which(text)
        if found:
            return Path(found)
    p = Path(text).expanduser()
    if not p.is_file():
        raise PackmolNotFoundError(f"PackMol executable {text!r} ({origin}) does not exist. {INSTALL_HINT}")
    if not os.access(p, os.X_OK):
        raise PackmolNotFoundError(f"PackMol executable {text!r} ({origin}) is not executable. {INSTALL_HINT}")
    return p


def find_packmol(binary: str | os.PathLike | None = None) -> Path:
    """The PackMol executable: ``binary`` if given, else ``$KFLOW_PACKMOL`` if set, else the wheel's binary, else
    ``packmol`` on PATH. A path named explicitly (argument or variable) must exist: there is no silent fallback.
    Raises ``PackmolNotFoundError`` with installation instructions."""
    if binary is not None and os.fspath(binary) != "":
        return _executable(binary, "binary argument")
    env = os.environ.get("KFLOW_PACKMOL", "")
    if env:
        return _executable(env, "$KFLOW_PACKMOL")
    wheel = _wheel_binary()
    if wheel is not None:
        return wheel
    found = shutil.which("packmol")
    if found:
        return Path(found)
    raise PackmolNotFoundError(f"PackMol executable not found (no binary argument, $KFLOW_PACKMOL unset, no "
                               f"`packmol` wheel installed, no `packmol` on PATH). {INSTALL_HINT}")


# ----------------------------------------------------------------------------------------------- geometry helpers
def _molecular_mass(atomic_numbers: np.ndarray) -> float:
    from ase.data import atomic_masses

    return float(atomic_masses[atomic_numbers].sum())  # g/mol


def sphere_radius(volume_A3: float) -> float:
    """Radius (Å) of a sphere of volume ``volume_A3`` (Å³)."""
    return (3.0 * volume_A3 / (4.0 * math.pi)) ** (1.0 / 3.0)


def _packing_volume(atomic_numbers, num_molecules, density_g_cm3, volume_A3) -> float:
    if (density_g_cm3 is None) == (volume_A3 is None):
        raise ValueError("give exactly one of density_g_cm3 (g/cm³) and volume_A3 (Å³)")
    if volume_A3 is not None:
        volume = float(volume_A3)
    else:
        density = float(density_g_cm3)
        if not density > 0:
            raise ValueError(f"density_g_cm3 must be positive, got {density_g_cm3}")
        volume = num_molecules * _molecular_mass(atomic_numbers) / AVOGADRO / density * A3_PER_CM3
    if not (volume > 0 and math.isfinite(volume)):
        raise ValueError(f"packing volume must be positive and finite, got {volume} Å³")
    return volume


def _distance_matrix(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x[..., :, None, :] - x[..., None, :, :], axis=-1)


# ----------------------------------------------------------------------------------------------- one PackMol run
def _tail(*texts) -> str:
    parts = []
    for t in texts:
        if t is None:
            continue
        if isinstance(t, bytes):
            t = t.decode("utf-8", "replace")
        if t.strip():
            parts.append(t.rstrip())
    text = "\n".join(parts)
    if not text:
        return "(PackMol wrote no output)"
    return text[-_OUTPUT_TAIL_CHARS:]


def _write_xyz(path: Path, symbols: list[str], coords: np.ndarray, comment: str):
    lines = [str(len(symbols)), comment]
    lines += [f"{s:<3s} {x:.8f} {y:.8f} {z:.8f}" for s, (x, y, z) in zip(symbols, coords)]
    path.write_text("\n".join(lines) + "\n")


def _read_packed(path: Path, symbols: list[str], num_molecules: int, log: str) -> np.ndarray:
    """PackMol's xyz output as [num_molecules, P, 3]; checks the atom count and the element of every atom."""
    num_atoms = len(symbols)
    expected = num_molecules * num_atoms
    if not path.is_file():
        raise PackmolError(f"PackMol exited without writing its output file {path.name}.\n--- PackMol output "
                           f"(tail) ---\n{log}")
    lines = path.read_text(errors="replace").splitlines()
    try:
        count = int(lines[0].split()[0])
    except (IndexError, ValueError):
        raise PackmolError(f"PackMol's output file {path.name} is empty or not xyz.\n--- PackMol output "
                           f"(tail) ---\n{log}") from None
    rows = [line.split() for line in lines[2:2 + expected] if line.strip()]
    if count != expected or len(rows) != expected:
        raise PackmolError(f"PackMol's output holds {min(count, len(rows))} atoms, expected {expected} "
                           f"({num_molecules} molecules x {num_atoms} atoms): short or malformed output.\n"
                           f"--- PackMol output (tail) ---\n{log}")
    try:
        coords = np.array([[float(v) for v in r[1:4]] for r in rows], dtype=np.float64)
    except (ValueError, IndexError):
        raise PackmolError(f"PackMol's output file {path.name} has unparsable coordinates.\n--- PackMol output "
                           f"(tail) ---\n{log}") from None
    if coords.shape != (expected, 3) or not np.isfinite(coords).all():
        raise PackmolError(f"PackMol's output has missing or non-finite coordinates.\n--- PackMol output "
                           f"(tail) ---\n{log}")
    got = [r[0] for r in rows]
    want = symbols * num_molecules
    if [g.lower() for g in got] != [w.lower() for w in want]:
        bad = next(i for i, (g, w) in enumerate(zip(got, want)) if g.lower() != w.lower())
        raise PackmolError(f"PackMol's output atom {bad} is {got[bad]!r}, expected {want[bad]!r}: the copies do "
                           f"not keep the input atom order.\n--- PackMol output (tail) ---\n{log}")
    return coords.reshape(num_molecules, num_atoms, 3)


def pack_cluster(atomic_numbers, body, num_molecules: int = 17, *, density_g_cm3: float | None = None,
                 volume_A3: float | None = None, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0,
                 binary: str | os.PathLike | None = None, timeout_s: float = 120.0, allow_imperfect: bool = False,
                 nloop: int | None = None) -> np.ndarray:
    """Pack ``num_molecules`` rigid copies of one molecule without overlap into a sphere centred at the origin,
    with the PackMol binary.

    Args:
        atomic_numbers: [P] atomic numbers of the molecule.
        body: [P, 3] its coordinates (Å), in any rigid pose.
        num_molecules: copies to pack.
        density_g_cm3, volume_A3: the packing region, exactly one of them. It is a sphere of volume
            ``volume_A3``, or of the volume that holds ``num_molecules`` molecules at mass density
            ``density_g_cm3`` (V = N·M / (N_A·ρ)). PackMol keeps every atom inside the sphere (a penalty
            constraint: atoms may poke out by a few hundredths of an Å).
        tolerance: minimum distance (Å) between atoms of different copies (PackMol's ``tolerance``).
        seed: PackMol's own ``seed`` keyword (0 <= seed < 2**31 - 1); the same seed, input and binary give the
            same packing.
        binary: the executable; None looks it up with ``find_packmol``.
        timeout_s: wall-clock limit of the run; the process is killed past it.
        allow_imperfect: PackMol exits with status 173 when it stops without meeting every constraint (some pair
            closer than ``tolerance`` or an atom outside the sphere) and then writes its best configuration.
            False raises ``PackmolError``; True warns and returns that best configuration.
        nloop: PackMol's ``nloop`` (optimisation rounds); None keeps its default.

    Returns:
        [num_molecules, P, 3] float64: copy k's atoms in the input's atom order, each copy a rigid motion of
        ``body`` (intramolecular distances checked to agree within 1e-3 Å).

    Raises ``PackmolNotFoundError`` when no binary is found and ``PackmolError`` when the run fails (non-zero exit,
    timeout, missing, short or non-rigid output), with the tail of PackMol's output. The temporary folder is
    removed in every case.
    """
    from ase.data import chemical_symbols

    z = np.asarray(atomic_numbers.detach().cpu() if torch.is_tensor(atomic_numbers) else atomic_numbers)
    if z.ndim != 1 or z.size == 0 or not np.all(z == np.round(z)):
        raise ValueError(f"atomic_numbers must be a non-empty 1-D integer array, got shape {z.shape}")
    z = z.astype(np.int64)
    if (z < 1).any() or (z > 118).any():
        raise ValueError("atomic_numbers must lie in 1..118")
    x = np.asarray(body.detach().cpu() if torch.is_tensor(body) else body, dtype=np.float64)
    if x.shape != (z.size, 3) or not np.isfinite(x).all():
        raise ValueError(f"body must be a finite [{z.size}, 3] array, got shape {x.shape}")
    num_molecules = int(num_molecules)
    if num_molecules < 1:
        raise ValueError(f"num_molecules must be >= 1, got {num_molecules}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    seed = int(seed)
    if not 0 <= seed < 2**31 - 1:
        raise ValueError(f"seed must satisfy 0 <= seed < 2**31 - 1 (PackMol treats -1 as 'from the clock'), got "
                         f"{seed}")
    volume = _packing_volume(z, num_molecules, density_g_cm3, volume_A3)
    radius = sphere_radius(volume)
    body0 = x - x.mean(0)
    molecule_radius = float(np.linalg.norm(body0, axis=1).max())
    if radius < molecule_radius:
        raise ValueError(f"packing sphere radius {radius:.3f} Å is smaller than the molecule's radius "
                         f"{molecule_radius:.3f} Å: not even one copy fits")
    exe = find_packmol(binary)
    symbols = [chemical_symbols[int(a)] for a in z]

    deck = [f"tolerance {float(tolerance):.6f}", "filetype xyz", "output packed.xyz", f"seed {seed}"]
    if nloop is not None:
        deck.append(f"nloop {int(nloop)}")
    deck += ["", "structure molecule.xyz", f"  number {num_molecules}",
             f"  inside sphere 0. 0. 0. {radius:.6f}", "end structure", ""]

    with tempfile.TemporaryDirectory(prefix="kflow-packmol-") as tmp:
        folder = Path(tmp)
        _write_xyz(folder / "molecule.xyz", symbols, body0, "kflow molecule")
        (folder / "pack.inp").write_text("\n".join(deck))
        try:
            # PackMol reads the deck on stdin and rewinds it, so stdin must be a (seekable) file, not a pipe.
            with open(folder / "pack.inp", "rb") as deck_file:
                proc = subprocess.run([str(exe)], stdin=deck_file, cwd=folder, capture_output=True, text=True,
                                      errors="replace", timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise PackmolError(f"PackMol ({exe}) timed out after {timeout_s:g} s packing {num_molecules} "
                               f"molecules of {z.size} atoms in a sphere of radius {radius:.2f} Å.\n"
                               f"--- PackMol output (tail) ---\n{_tail(e.stdout, e.stderr)}") from None
        except OSError as e:
            raise PackmolError(f"PackMol ({exe}) could not be started: {e}") from e
        log = _tail(proc.stdout, proc.stderr)
        if proc.returncode == IMPERFECT_PACKING_EXIT and allow_imperfect:
            warnings.warn(f"PackMol ended without perfect packing (exit {IMPERFECT_PACKING_EXIT}): some atoms of "
                          f"different copies are closer than {tolerance} Å or outside the sphere; using its best "
                          f"configuration", RuntimeWarning, stacklevel=2)
        elif proc.returncode == IMPERFECT_PACKING_EXIT:
            raise PackmolError(f"PackMol ({exe}) ended without perfect packing (exit {IMPERFECT_PACKING_EXIT}): "
                               f"{num_molecules} copies do not fit a sphere of radius {radius:.2f} Å with "
                               f"tolerance {tolerance} Å (lower the density, or pass allow_imperfect=True to "
                               f"accept its best configuration).\n--- PackMol output (tail) ---\n{log}")
        elif proc.returncode != 0:
            raise PackmolError(f"PackMol ({exe}) exited with status {proc.returncode}.\n--- PackMol output "
                               f"(tail) ---\n{log}")
        packed = _read_packed(folder / "packed.xyz", symbols, num_molecules, log)

    reference = _distance_matrix(body0)
    deviation = np.abs(_distance_matrix(packed) - reference).max(axis=(1, 2))  # [num_molecules]
    if (deviation > RIGID_ATOL).any():
        k = int(deviation.argmax())
        raise PackmolError(f"PackMol's copy {k} is not a rigid copy of the input molecule: an intramolecular "
                           f"distance differs by {deviation[k]:.2e} Å (> {RIGID_ATOL} Å).\n--- PackMol output "
                           f"(tail) ---\n{log}")
    return packed


# ----------------------------------------------------------------------------------------------- data set baseline
def _molecule_layout(cluster):
    """(molecule_index [N], rank of each atom within its molecule [N], molecule count, atoms per molecule)."""
    mol = cluster.molecule_index.cpu().numpy().astype(np.int64)
    num_molecules = int(mol.max()) + 1
    counts = np.bincount(mol, minlength=num_molecules)
    if (counts != counts[0]).any() or (counts == 0).any():
        raise ValueError(f"cluster {cluster.name!r}: molecules must be non-empty copies of one molecule, got atom "
                         f"counts {counts.tolist()}")
    order = np.argsort(mol, kind="stable")
    rank = np.empty_like(mol)
    rank[order] = np.arange(mol.size) - np.repeat(np.cumsum(counts) - counts, counts)
    return mol, rank, num_molecules, int(counts[0])


def cluster_packing_volume(cluster) -> float:
    """Volume (Å³) of the sphere enclosing the true (final) cluster: radius = largest distance of a molecule
    centroid from the cluster centroid + the molecule's radius (largest atom distance from its centroid). The
    mass of the cluster over this volume is the density ``packmol_predictions`` packs at by default."""
    mol, rank, num_molecules, atoms = _molecule_layout(cluster)
    final = cluster.final_positions.double().cpu().numpy()
    centre = final.mean(0)
    molecules = np.zeros((num_molecules, atoms, 3))
    molecules[mol, rank] = final
    centroids = molecules.mean(1)
    molecule_radius = np.linalg.norm(molecules[0] - centroids[0], axis=1).max()
    radius = np.linalg.norm(centroids - centre, axis=1).max() + molecule_radius
    return 4.0 / 3.0 * math.pi * float(radius) ** 3


def _cluster_seed(seed: int, index: int) -> int:
    """A PackMol seed per (seed, cluster index), in 1..2**31 - 2, independent across clusters and seeds."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] % (2**31 - 2)) + 1


def packmol_predictions(dataset, seed: int = 0, *, density_g_cm3: float | None = None,
                        tolerance: float = DEFAULT_TOLERANCE, binary: str | os.PathLike | None = None,
                        timeout_s: float = 120.0, allow_imperfect: bool = True, nloop: int | None = None,
                        progress: bool = False) -> list[torch.Tensor]:
    """The PackMol baseline for every cluster of a ``ClusterDataset``: one [1, N_i, 3] tensor per cluster, in the
    cluster's atom order, ready for ``evaluate_assembly(dataset, predictions)``.

    The molecule is the cluster's molecule 0 as it sits in the final (crystal) cluster: the rigid molecule is
    assumed known, as for every model. PackMol packs the cluster's molecule count of copies into a sphere and the
    result is translated so its centroid (mean of all atoms) is the true cluster's centroid.

    Packing region: by default the sphere that encloses the true final cluster (``cluster_packing_volume``:
    farthest molecule centroid from the cluster centroid + the molecule's radius), i.e. the cluster's own mass
    density within that sphere. This gives PackMol the crystal's packing density and the true cluster's extent,
    the information a fair classical baseline is granted ("pack the molecules at the crystal's density"), and is
    always large enough for the true cluster itself. ``density_g_cm3`` instead packs every cluster at one fixed
    density (e.g. 1.3 g/cm³, crystal-like for organics), using no information from the final cluster.

    Molecule numbering: PackMol's copies have no correspondence with the true cluster's molecules. The copy
    whose centroid is nearest the packed cluster's centroid becomes molecule 0 (the central molecule), the others molecules 1.. in PackMol's
    order. Only permutation-invariant metrics (RMSD₁₅, permutation-invariant PM, collision/separation rates) are
    meaningful for this baseline; index-paired PM-atom/PM-center are not.

    Each cluster gets its own PackMol seed derived from (``seed``, cluster position), so a run is reproducible.
    ``allow_imperfect`` (default True) keeps PackMol's best configuration when it cannot meet every constraint,
    with a warning, so every cluster gets a prediction; False raises ``PackmolError`` instead. ``progress`` shows a
    tqdm bar.
    """
    exe = find_packmol(binary)  # fail before the loop when PackMol is missing
    indices = range(len(dataset))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="packmol", unit="cluster")
    predictions = []
    for i in indices:
        cluster = dataset.cluster(i)
        mol, rank, num_molecules, atoms = _molecule_layout(cluster)
        final = cluster.final_positions.double().cpu().numpy()
        z = cluster.atomic_numbers.cpu().numpy()
        by_molecule = np.zeros((num_molecules, atoms), dtype=z.dtype)
        by_molecule[mol, rank] = z
        if (by_molecule != by_molecule[0]).any():
            raise ValueError(f"cluster {cluster.name!r}: molecules list different elements or atom orders")
        first = np.flatnonzero(mol == 0)  # molecule 0's atoms in cluster order = rank order
        body, body_z = final[first], z[first]
        region = ({"density_g_cm3": density_g_cm3} if density_g_cm3 is not None
                  else {"volume_A3": cluster_packing_volume(cluster)})
        packed = pack_cluster(body_z, body, num_molecules, tolerance=tolerance, seed=_cluster_seed(seed, i),
                              binary=exe, timeout_s=timeout_s, allow_imperfect=allow_imperfect, nloop=nloop,
                              **region)
        centroids = packed.mean(1)
        central = int(np.linalg.norm(centroids - centroids.mean(0), axis=1).argmin())
        copies = [central] + [k for k in range(num_molecules) if k != central]
        packed = packed[copies]
        packed += final.mean(0) - packed.reshape(-1, 3).mean(0)
        positions = packed[mol, rank]  # [N, 3] in the cluster's atom order
        predictions.append(torch.from_numpy(positions).to(cluster.final_positions.dtype)[None])
    return predictions
