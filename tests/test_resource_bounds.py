"""Issue 24, resource bounds: a 9 KB CIF with a 0.0001 Å cell ran for minutes at 7 GB, and a 20,000-atom XYZ
allocated 9 GB for an N x N x 3 geometry check; both are now refused in one line before any such work, and a
folder build accounts for them in its summary."""
import json
import time
from pathlib import Path

import numpy as np
import pytest

from kflow.cli import main
from kflow.molecular.assemble.inputs import MAX_MOLECULE_ATOMS, InputError
from kflow.molecular.assemble.readers import read_assembly_input
from kflow.molecular.data.bounds import MAX_CELL_ATOMS, MIN_CELL_WIDTH, cell_problem
from kflow.molecular.data.cif import read_cif
from kflow.molecular.data.crystals import read_crystals
from kflow.molecular.data.sources import build_clusters_from_files

REPO = Path(__file__).resolve().parents[1]
CIF = REPO / "data" / "examples" / "GASXON.cif"


def _tiny_cell_cif(path: Path) -> Path:
    lines = [("_cell_length_a 0.0001" if line.startswith("_cell_length_a") else line)
             for line in CIF.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _big_xyz(path: Path, atoms: int = 20_000) -> Path:
    grid = np.stack(np.meshgrid(*[np.arange(28)] * 3, indexing="ij"), -1).reshape(-1, 3)[:atoms] * 1.5
    path.write_text(f"{atoms}\nbig\n" + "".join(f"C {x:.3f} {y:.3f} {z:.3f}\n" for x, y, z in grid))
    return path


def test_a_tiny_cell_is_refused_before_any_neighbour_search(tmp_path):
    path = _tiny_cell_cif(tmp_path / "tiny.cif")
    problems, t0 = [], time.perf_counter()
    assert list(read_cif(path, problems)) == []
    assert time.perf_counter() - t0 < 10  # ran past 120 s before
    assert problems[0].reason == "out_of_bounds" and f"{MIN_CELL_WIDTH}" in problems[0].message
    with pytest.raises(InputError, match="tiny.cif: out_of_bounds: .*thin"):
        read_assembly_input(str(path))


def test_a_20000_atom_molecule_is_refused_before_pairwise_geometry(tmp_path, capsys):
    import tracemalloc

    path = _big_xyz(tmp_path / "big.xyz")
    tracemalloc.start()
    with pytest.raises(InputError, match=f"big.xyz: too_large: 20000 atoms.*{MAX_MOLECULE_ATOMS}"):
        read_assembly_input(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 500 * 2 ** 20  # the N x N x 3 check allocated 8.9 GiB
    assert main(["assemble", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "too_large" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _clumped_cif(path: Path, sites: int) -> Path:
    """Fm-3m with every site on a special position: ``2 * sites * 192`` symmetry copies on 8 points."""
    rows = "".join(f"C{k} C 0 0 0\nH{k} H 0.5 0.5 0.5\n" for k in range(sites))
    path.write_text("data_clump\n_cell_length_a 6.0\n_cell_length_b 6.0\n_cell_length_c 6.0\n_cell_angle_alpha 90\n"
                    "_cell_angle_beta 90\n_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'F m -3 m'\nloop_\n"
                    "_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n"
                    "_atom_site_fract_z\n" + rows)
    return path


def test_symmetry_copies_piled_on_special_positions_merge_in_bounded_time_and_memory(tmp_path):
    import tracemalloc

    path = _clumped_cif(tmp_path / "clump.cif", sites=3)  # 1 KB; 1152 copies on 8 points
    tracemalloc.start()
    t0 = time.perf_counter()
    (name, atoms), = read_cif(path, [])
    elapsed, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(atoms) == 8 and sorted(atoms.numbers) == [1] * 4 + [6] * 4
    # ASE's neighbour list padded every 3 A bin to its fullest: 715 MB here, 7.7 GB with 10 sites, 5 GB and 24 s
    # for `kflow assemble` of a 6.5 KB file with 26
    assert peak < 100 * 2 ** 20 and elapsed < 5, (peak, elapsed)


def test_merging_copies_drops_what_the_neighbour_list_dropped():
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    from kflow.molecular.data.cif import DUPLICATE_TOLERANCE, _later_duplicates

    rng = np.random.default_rng(0)
    cell = np.array([[7.0, 0, 0], [3.1, 6.2, 0], [-1.3, 2.2, 5.4]])  # skewed
    base = rng.random((40, 3))
    near = (base[:25] + rng.normal(0, 0.008, (25, 3))) % 1.0  # within and beyond 0.1 A of an earlier atom
    frac = np.concatenate([base, near, base[:10] + 1.0, np.round(base[5:15], 3)]) % 1.0
    numbers = rng.choice([1, 6], len(frac))
    numbers[40:] = np.concatenate([numbers[:25], numbers[:10], numbers[5:15]])
    numbers[[41, 47]] = 7 - numbers[[41, 47]]  # another element at the same place: kept
    atoms = Atoms(numbers=numbers, scaled_positions=frac, cell=cell, pbc=True)
    i, j = neighbor_list("ij", atoms, DUPLICATE_TOLERANCE)
    expected = np.zeros(len(atoms), dtype=bool)
    expected[j[(j > i) & (numbers[i] == numbers[j])]] = True
    dropped = _later_duplicates(frac, numbers, cell, DUPLICATE_TOLERANCE)
    assert 20 < expected.sum() < 60 and np.array_equal(dropped, expected)


def _grid_atoms(count: int, spacing: float, cell):
    from ase import Atoms

    grid = np.stack(np.meshgrid(*[np.arange(22)] * 3, indexing="ij"), -1).reshape(-1, 3)[:count]
    return Atoms(numbers=np.where(np.arange(count) % 2, 1, 6), positions=grid * spacing + 5.0, cell=cell, pbc=True)


@pytest.mark.parametrize("count, spacing, reason", [(500, 1.5, "multi_component"), (2000, 0.6, "out_of_bounds")])
def test_finding_molecules_in_a_sparse_or_crowded_cell_is_bounded(count, spacing, reason):
    import tracemalloc

    from kflow.molecular.data.cluster import InvalidCrystal
    from kflow.molecular.data.molecules import find_molecules

    atoms = _grid_atoms(count, spacing, np.eye(3) * 999.0)  # inside every bound a cell is checked against
    assert cell_problem(atoms.cell.array, len(atoms)) is None
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(InvalidCrystal) as caught:  # ASE's neighbour list asked for 70 GiB (500 atoms), 1.1 TiB
        find_molecules(atoms)
    elapsed, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert caught.value.reason == reason and peak < 300 * 2 ** 20 and elapsed < 10, (str(caught.value), peak)


def test_bonded_pairs_are_the_neighbour_lists():
    from ase.neighborlist import neighbor_list

    from kflow.molecular.data.molecules import _bonded_pairs

    chain = _grid_atoms(6, 1.0, np.diag([2.5, 30.0, 30.0]))  # bonds to its own images across a thin cell
    chain.positions[:] = np.c_[np.arange(6) * 0.4, np.full(6, 5.0), np.full(6, 5.0)]
    chain.positions[3] += [2.5, 0.3, 0.0]  # atoms outside the cell are allowed
    for atoms in (next(read_crystals(CIF))[1], chain):
        radii = np.full(len(atoms), 0.8)
        radii[atoms.numbers == 1] = 0.4
        ours = _bonded_pairs(atoms, radii)
        theirs = neighbor_list("ijdS", atoms, radii)
        key = lambda i, j, d, S: sorted(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))  # noqa: E731
        assert len(ours[0]) > 10 and key(*ours) == key(*theirs)
        i, j, d, shift = ours
        between = atoms.positions[j] + shift @ atoms.cell.array - atoms.positions[i]
        assert np.allclose(d, np.linalg.norm(between, axis=1))
        assert (np.diff(i) >= 0).all()  # sorted by the first atom, as ASE's


def test_cell_bounds():
    cell = np.diag([10.0, 10.0, 10.0])
    assert cell_problem(cell, 100) is None
    assert "thin" in cell_problem(np.diag([10.0, 10.0, 0.5]), 10)
    assert "long" in cell_problem(np.diag([10.0, 10.0, 5000.0]), 10)
    assert "per atom" in cell_problem(cell, 900)
    assert "atoms in the cell" in cell_problem(np.diag([100.0] * 3), MAX_CELL_ATOMS + 1)
    assert "finite" in cell_problem(np.full((3, 3), np.nan), 1)


def test_a_folder_build_accounts_for_the_pathological_files(tmp_path):
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "GASXON.cif").write_bytes(CIF.read_bytes())
    _tiny_cell_cif(folder / "tiny.cif")
    t0 = time.perf_counter()
    store, summary = build_clusters_from_files([folder], tmp_path / "out", draws_per_crystal=1, num_workers=1,
                                               progress=False)
    assert time.perf_counter() - t0 < 60 and len(store) == 1
    files = json.loads((tmp_path / "out" / "summary.json").read_text())["files"]
    assert set(files) == {str(folder / "GASXON.cif"), str(folder / "tiny.cif")}
    assert "out_of_bounds" in json.dumps(files[str(folder / "tiny.cif")])
    assert [name for name, _ in read_crystals(folder / "GASXON.cif")] == ["GASXON"]


def test_a_folder_build_lists_every_file_of_the_folder_and_reads_with_the_workers_given(tmp_path, monkeypatch):
    from kflow.molecular.data import sources

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "GASXON.cif").write_bytes(CIF.read_bytes())
    _big_xyz(folder / "big.xyz", atoms=30)
    (folder / "notes.txt").write_text("mine")
    (folder / ".DS_Store").write_bytes(b"\0")
    seen = []

    def reading(files, workers=None, **limits):
        seen.append(workers)
        return real_reading(files, workers, **limits)

    real_reading = sources.read_crystal_inputs
    monkeypatch.setattr(sources, "read_crystal_inputs", reading)
    store, summary = build_clusters_from_files([folder], tmp_path / "out", draws_per_crystal=1, num_workers=1,
                                               progress=False)
    assert seen == [1]  # --workers 1 read with one worker per core before
    files = json.loads((tmp_path / "out" / "summary.json").read_text())["files"]
    assert set(files) == {str(folder / name) for name in ("GASXON.cif", "big.xyz", "notes.txt", ".DS_Store")}
    assert files[str(folder / "GASXON.cif")]["status"] == "built"  # the others were not in the summary at all
    for name in ("big.xyz", "notes.txt", ".DS_Store"):
        record = files[str(folder / name)]
        assert record["status"] == "rejected" and record["rejected"] == {"not_read": 1}
        assert "give it by name" in record["messages"][0]


def test_the_readers_are_imported_once_before_the_workers_fork():
    import subprocess
    import sys

    probe = ("import sys\nfrom kflow.molecular.data import sources\nreal = sources.isolated_map\n"
             "def checked(*args):\n    assert {'ase.io', 'ase.io.cif', 'ase.db'} <= set(sys.modules)\n"
             "    return real(*args)\nsources.isolated_map = checked\n"
             f"crystals, _ = sources.read_crystal_inputs([{str(CIF)!r}], 1, progress=True)\nprint(len(crystals))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr  # each worker imported ASE's io: 10x
    assert "reading" in done.stderr  # a progress bar while the files are read


def test_a_20000_atom_xyz_given_to_a_folder_build_is_refused_in_bounded_memory(tmp_path):
    import resource

    big = _big_xyz(tmp_path / "big.xyz")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    store, summary = build_clusters_from_files([CIF, big], tmp_path / "out", draws_per_crystal=1, num_workers=1,
                                               progress=False)
    files = json.loads((tmp_path / "out" / "summary.json").read_text())["files"]
    assert files[str(big)]["status"] == "rejected" and len(store) == 1
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib < 2 * 2 ** 20 or peak_kib == before  # the reading worker stayed far below 2 GiB


# ---------------------------------------------------------------------------------------------- docs/PROMISES.md
PROMISES = REPO / "docs" / "PROMISES.md"


def test_the_promises_are_linked_and_name_the_bounds_the_code_applies():
    import re

    from kflow.core import training
    from kflow.molecular.assemble import crystals, inputs, models
    from kflow.molecular.data import bounds
    from kflow.molecular.physics import relax
    from kflow.utils import cli

    text = PROMISES.read_text()
    assert "docs/PROMISES.md" in (REPO / "README.md").read_text()
    for heading in ("Nothing lost", "Nothing hung", "One writer per run folder", "Exact resume", "Determinism",
                    "One line, not a traceback"):
        assert f"**{heading}" in text, heading
    rows = re.findall(r"\| ([0-9.]+)[^|]*\| `(\w+)\.(\w+)` \|", text.replace("at least ", "").replace("at most ", ""))
    modules = {"inputs": inputs, "bounds": bounds, "models": models, "relax": relax, "cli": cli, "crystals": crystals}
    assert len(rows) == 14
    for value, module, name in rows:
        assert float(value) == getattr(modules[module], name), name
    assert f"`{training.RUN_LOCK}`" in text
    named = set(re.findall(r"\b(test_\w+\.py)\b", text))
    assert named and all(list((REPO / "tests").rglob(test_file)) for test_file in named), named
    from kflow.molecular.commands import train_parser

    options = train_parser().format_help()
    assert "--accept-changes" in options and "--resume [CHECKPOINT]" in options
    for promise in ("`PATH@N`", "`PATH@id=K`", "`renamed`", "`not_read`", "`kflow sample`"):
        assert promise in text, promise
    measured = text.split("**Measured.**")[1]
    scripts = re.findall(r"python (\S+\.py)", measured)
    assert scripts == ["benchmarks/reliability_corpus.py", "scripts/build_clusters.py"]
    assert all((REPO / script).is_file() for script in scripts) and "all 595 files in `summary.json`" in measured


def _misbehaving_reader(path):
    """Stands in for a reader meeting a pathological file (forked workers inherit it)."""
    import os

    from kflow.molecular.data import sources

    name = Path(path).name
    if name == "slow.cif":
        time.sleep(60)
    if name == "hog.cif":
        hoard = [np.ones(2 ** 24) for _ in range(10_000)]  # 128 MiB at a time, far past the limit
        return hoard
    if name == "dies.cif":
        os._exit(9)
    return sources._real_read_file(path)


def test_one_pathological_file_can_neither_stall_nor_kill_a_folder_build(tmp_path, monkeypatch):
    from kflow.molecular.data import sources

    files = []
    for name in ("GASXON.cif", "slow.cif", "hog.cif", "dies.cif"):
        (tmp_path / name).write_bytes(CIF.read_bytes())
        files.append(tmp_path / name)
    monkeypatch.setattr(sources, "_real_read_file", sources._read_file, raising=False)
    monkeypatch.setattr(sources, "_read_file", _misbehaving_reader)
    t0 = time.perf_counter()
    # 10 s, not less: on a loaded machine the memory hog needs seconds of CPU to write its first 512 MiB
    crystals, summary = sources.read_crystal_inputs(files, workers=2, time_limit=10, memory_limit=512 * 2 ** 20)
    assert time.perf_counter() - t0 < 30  # the slow file alone would take 60 s
    assert [name for name, _ in crystals] == ["GASXON"]
    report = json.dumps(summary.as_dict())
    assert "slow.cif: exceeded the time limit of 10 s" in report
    assert "hog.cif: exceeded the memory limit of 0.5 GiB" in report
    assert "dies.cif: its worker died" in report
