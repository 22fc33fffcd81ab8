"""Issue 14: every input accounted for. Real-world CIF edge cases (made here from small inputs), per-file build
summaries, content-keyed caches, transactional builds, planar molecules, and AssembleFlow's COD-Cluster17 layout."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase
import ase.db
import numpy as np
import pytest
import torch

from kflow.molecular import InvalidCrystal, build_cluster, read_crystals, write_cod_cluster17
from kflow.molecular.data.cluster import RejectionSummary
from kflow.molecular.data.cif import cif_number
from kflow.molecular.data.molecules import find_molecules
from kflow.molecular.data.datasets import CODCluster17Dataset
from kflow.molecular.data.cod import COD_HUB_PATTERNS, cod_cluster17_ids
from kflow.molecular.data.sources import build_clusters_from_files
from kflow.molecular.data.store import ClusterStore, clean_leftovers, staged_folder, write_cluster_store
from kflow.molecular.workflow import load_assembly_dataset

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = REPO / "scripts"


def pyxtal_cif(name: str) -> Path:
    import pyxtal

    return Path(pyxtal.__file__).parent / "database" / "cifs" / f"{name}.cif"


# ------------------------------------------------------------------------------------------- CIF inputs
OPS = "x,y,z|-x,1/2+y,1/2-z|-x,-y,-z|x,1/2-y,1/2+z"  # P 1 21/c 1 (anthracene, ANTCEN24)
CELL = {"a": "9.3056(6)", "b": "5.9879(3)", "c": "8.4252(5)", "alpha": "90", "beta": "102.620(6)", "gamma": "90"}


def _anthracene_sites():
    """(label, type symbol, x, y, z) of the asymmetric unit of pyxtal's anthracene.cif."""
    lines = pyxtal_cif("anthracene").read_text().splitlines()
    return [ln.split()[:5] for ln in lines if re.match(r"^[CH]\d+ [CH] ", ln)]


def make_cif(block="ANTH", symmetry="ops", ops=OPS, ops_tag="_symmetry_equiv_pos_as_xyz", cell=True,
             atoms=True, occupancy=None, type_symbol=True, cartesian=False, prefix=""):
    """An anthracene CIF in one of the ways real files state the same crystal."""
    out = [prefix + f"data_{block}"]
    if symmetry == "ops" or isinstance(symmetry, str) and symmetry.startswith("ops+"):
        if symmetry.startswith("ops+"):
            out.append(symmetry[4:])
        out += ["loop_", ops_tag.replace("operation_xyz", "id").replace("as_xyz", "site_id"), ops_tag]
        out += [f"{i + 1} {op}" for i, op in enumerate(ops.split("|"))]
    elif symmetry:
        out.append(symmetry)
    if cell:
        cellpar = dict(CELL, **(cell if isinstance(cell, dict) else {}))
        out += [f"_cell_length_{k} {cellpar[k]}" for k in "abc"]
        out += [f"_cell_angle_{k} {cellpar[k]}" for k in ("alpha", "beta", "gamma")]
    if atoms:
        sites = _anthracene_sites()
        heads = ["_atom_site_label"] + (["_atom_site_type_symbol"] if type_symbol else [])
        if cartesian:
            from ase.geometry import cellpar_to_cell

            m = cellpar_to_cell([cif_number(CELL[k]) for k in ("a", "b", "c", "alpha", "beta", "gamma")])
            heads += ["_atom_site_Cartn_x", "_atom_site_Cartn_y", "_atom_site_Cartn_z"]
        else:
            heads += ["_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z"]
        if occupancy is not None:
            heads.append("_atom_site_occupancy")
        out += ["loop_", *heads]
        for i, (label, sym, x, y, z) in enumerate(sites):
            xyz = [x, y, z]
            if cartesian:
                xyz = [f"{v:.5f}" for v in np.array([cif_number(v) for v in xyz]) @ m]
            row = [label] + ([sym] if type_symbol else []) + xyz
            if occupancy is not None:
                row.append(occupancy(i) if callable(occupancy) else occupancy)
            out.append(" ".join(row))
    return "\n".join(out) + "\n"


def same_crystal(a, b, tol=0.01) -> bool:
    """Same cell parameters, and every atom of one has an atom of the same element within ``tol`` Å in the other
    (compared in fractional coordinates: readers may orient the cell differently)."""
    if len(a) != len(b) or not np.allclose(a.cell.cellpar(), b.cell.cellpar(), atol=1e-4):
        return False
    d = a.get_scaled_positions()[:, None] - b.get_scaled_positions()[None]
    dist = np.linalg.norm((d - np.round(d)) @ a.cell.array, axis=-1)
    dist[a.numbers[:, None] != b.numbers[None]] = np.inf
    return bool((dist.min(0) < tol).all() and (dist.min(1) < tol).all())


# Each edge case: file text and the expected outcome: "built" (same crystal as the reference) or a reason.
EDGE_CASES = {
    "occupancy_questionmark": (make_cif(occupancy="?"), "built"),
    "occupancy_dot": (make_cif(occupancy="."), "built"),
    "occupancy_uncertainty": (make_cif(occupancy="1.00(2)"), "built"),
    "occupancy_partial": (make_cif(occupancy=lambda i: "0.52(3)" if i == 0 else "1"), "disordered"),
    "hm_full_with_ops": (make_cif(symmetry="ops+_symmetry_space_group_name_H-M 'P 1 21/c 1'"), "built"),
    "hm_full_with_ops_hall_number": (make_cif(
        symmetry="ops+_symmetry_space_group_name_H-M 'P 1 21/c 1'\n_space_group_name_Hall '-P 2ybc'\n"
                 "_symmetry_Int_Tables_number 14"), "built"),
    "hm_full_only": (make_cif(symmetry="_symmetry_space_group_name_H-M 'P 1 21/c 1'"), "built"),
    "hm_short_only": (make_cif(symmetry="_symmetry_space_group_name_H-M 'P 21/c'"), "built"),
    "hm_with_remark": (make_cif(symmetry="_symmetry_space_group_name_H-M 'P 21/c (No. 14)'"), "built"),
    "hm_new_tag_no_spaces": (make_cif(symmetry="_space_group_name_H-M_alt 'P121/c1'"), "built"),
    "hall_only": (make_cif(symmetry="_space_group_name_Hall '-P 2ybc'"), "built"),
    "number_only": (make_cif(symmetry="_space_group_IT_number 14"), "built"),
    "symmetry_operations_only": (make_cif(), "built"),
    "symmetry_operations_new_tags": (make_cif(ops_tag="_space_group_symop_operation_xyz"), "built"),
    "symmetry_operations_other_spelling": (make_cif(ops="X,Y,Z|-X,Y+0.5,-Z+1/2|-X,-Y,-Z|'X, -Y+1/2, Z+1/2'"),
                                           "built"),
    "no_type_symbol": (make_cif(type_symbol=False), "built"),
    "cartesian": (make_cif(cartesian=True), "built"),
    "publication_block_first": (make_cif(prefix="data_global\n_journal_name_full 'J. Test'\n_publ_section_title\n"
                                               ";\nA title; with data_ in it\n;\n"), "built"),
    "latin1_text": (make_cif(symmetry="ops+_publ_contact_author_name 'M\xfcller'"), "built"),
    "save_frame_needs_pymatgen": (make_cif().replace("loop_\n_atom_site_label", "save_x\n_b 1\nsave_\nloop_\n"
                                                     "_atom_site_label"), "built"),
    "no_cell": (make_cif(cell=False), "no_cell"),
    "unknown_cell_length": (make_cif(cell={"a": "?"}), "no_cell"),
    "no_coordinates": (make_cif(atoms=False), "no_atoms"),
    "unknown_coordinate": (make_cif().replace("0.58950(11)", "?"), "missing_coordinates"),
    "empty": ("", "no_structure"),
    "comment_only": ("# nothing but a comment\n", "no_structure"),
    "dictionary_only": ("data_journal\n_journal_name_full 'J. Test'\n_journal_year 2001\n", "no_structure"),
    "unknown_space_group": (make_cif(symmetry="_symmetry_space_group_name_H-M 'X 99'"), "unreadable"),
    "loop_row_with_extra_value": (make_cif().replace("C1 C 0.58950(11)", "C1 C 0.58950(11) extra"), "unreadable"),
    "binary": ("\x00\x01\x02 not a CIF \xff", "unreadable"),
}


@pytest.fixture(scope="module")
def edge_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge_cifs")
    for name, (text, _) in EDGE_CASES.items():
        (folder / f"{name}.cif").write_bytes(text.encode("latin-1"))
    return folder


def test_cif_conventions_for_numbers():
    assert cif_number("0.123(4)") == 0.123 and cif_number("-.5") == -0.5 and cif_number("1.5E-2(3)") == 0.015
    assert cif_number("?", 1.0) == 1.0 and cif_number(".", 1.0) == 1.0 and cif_number(None, 1.0) == 1.0
    assert cif_number("'0.25'") == 0.25 and cif_number("1/2") == 0.5 and cif_number(3) == 3.0
    with pytest.raises(ValueError):
        cif_number("abc")


def test_every_cif_edge_case_is_read_as_the_same_crystal_or_named(edge_folder):
    (_, reference), = list(read_crystals(pyxtal_cif("anthracene")))
    for name, (_, outcome) in EDGE_CASES.items():
        errors = []
        crystals = list(read_crystals(edge_folder / f"{name}.cif", errors))  # never raises with a list
        if outcome in ("built", "disordered"):
            assert len(crystals) == 1 and not errors, (name, errors)
            crystal_name, atoms = crystals[0]
            assert crystal_name == name and atoms.info["source"] == str(edge_folder / f"{name}.cif")
            assert len(atoms) == 48 and same_crystal(atoms, reference), name
            assert atoms.info["reader"] == ("pymatgen" if "pymatgen" in name else "ase"), name
        else:
            assert crystals == [] and len(errors) == 1, (name, crystals, errors)
            assert errors[0].reason == outcome and errors[0].file == str(edge_folder / f"{name}.cif"), name
            assert name in errors[0].source and errors[0].message, name
    with pytest.raises(ValueError, match="no_cell"):  # without an error list, a problem is an exception
        list(read_crystals(edge_folder / "no_cell.cif"))


def test_settings_other_than_the_standard_one_are_expanded_correctly(tmp_path):
    """Naphthalene is stored in P 21/a (not the standard P 21/c): the symbol alone must give the same crystal as
    the listed operations, never the standard setting."""
    text = pyxtal_cif("naphthalene").read_text()
    (_, reference), = list(read_crystals(pyxtal_cif("naphthalene")))
    no_ops = re.sub(r"loop_\n_symmetry_equiv_pos_site_id\n_symmetry_equiv_pos_as_xyz\n(?:\d+ [^\n]+\n)+", "", text)
    no_ops = no_ops.replace("_space_group_name_Hall           '-P 2yab'\n", "")
    assert "equiv_pos" not in no_ops and "'P 21/a'" in no_ops
    variants = {"short": no_ops, "full": no_ops.replace("'P 21/a'", "'P 1 21/a 1'"),
                "hall": no_ops.replace("_symmetry_space_group_name_H-M   'P 21/a'", "_space_group_name_Hall '-P 2yab'")}
    for name, variant in variants.items():
        (tmp_path / f"{name}.cif").write_text(variant)
        (_, atoms), = list(read_crystals(tmp_path / f"{name}.cif"))
        assert same_crystal(atoms, reference), name
        assert atoms.info["reader"] == "ase"


def test_pymatgen_reads_what_the_first_reader_cannot(tmp_path, monkeypatch):
    from kflow.molecular.data import cif, clusters

    (tmp_path / "a.cif").write_text(make_cif())
    monkeypatch.setattr(cif, "_block_atoms", lambda block: 1 / 0)
    (name, atoms), = list(read_crystals(tmp_path / "a.cif"))
    assert atoms.info["reader"] == "pymatgen" and len(atoms) == 48
    summary = RejectionSummary()
    assert len(list(clusters.build_clusters([(name, atoms)], summary=summary))) == 1
    assert summary.readers == {"pymatgen": 1}


def test_occupancy_strings_never_crash_the_builder():
    (_, atoms), = list(read_crystals(pyxtal_cif("benzene")))
    for value, disordered in (("?", False), (".", False), ("1.0(1)", False), ("0.5(1)", True), ("junk", True)):
        atoms.info["occupancy"] = {str(i): {"C": value if i == 3 else 1.0} for i in range(len(atoms))}
        if disordered:
            with pytest.raises(InvalidCrystal) as err:
                find_molecules(atoms)
            assert err.value.reason == "disordered"
        else:
            assert find_molecules(atoms).positions.shape[0] == 4


def test_folder_build_accounts_for_every_file(edge_folder, tmp_path, capsys):
    sys.path.insert(0, str(SCRIPTS))
    import build_clusters

    notes = edge_folder / "notes.txt"
    notes.write_text("not a crystal")  # not an input (folders contribute their .cif files), but accounted for
    out = tmp_path / "built"
    assert build_clusters.main([str(edge_folder), "--out", str(out), "--draws", "1", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"input files: {len(EDGE_CASES) + 1}" in printed and str(out / "summary.json") in printed
    summary = json.loads((out / "summary.json").read_text())
    files = summary["files"]
    assert files.pop(str(notes))["rejected"] == {"not_read": 1}  # listed as not read, with how to read it
    summary["rejected"].pop("not_read")
    summary["file_status"]["rejected"] -= 1
    assert sorted(files) == sorted(str(edge_folder / f"{n}.cif") for n in EDGE_CASES)  # every file, once
    for name, (_, outcome) in EDGE_CASES.items():
        record = files[str(edge_folder / f"{name}.cif")]
        if outcome == "built":
            assert record["status"] == "built" and record["kept"] == 1, (name, record)
        elif outcome == "unreadable":
            assert record["status"] == "error" and record["rejected"] == {"unreadable": 1}, (name, record)
            assert record["messages"] and str(edge_folder / name) in record["messages"][0]
        else:
            assert record["status"] == "rejected" and record["rejected"] == {outcome: 1}, (name, record)
    assert "error" not in summary["rejected"]  # no crash on any file
    built = sum(1 for _, o in EDGE_CASES.values() if o == "built")
    assert summary["kept"] == built and summary["kept"] + sum(summary["rejected"].values()) == len(EDGE_CASES)
    errors = sum(1 for _, o in EDGE_CASES.values() if o == "unreadable")
    assert summary["file_status"] == {"built": built, "rejected": len(EDGE_CASES) - built - errors, "error": errors}
    assert summary["readers"] == {"ase": built - 1, "pymatgen": 1}
    assert len(ClusterStore(out / "processed" / "clusters.lmdb")) == built


def test_duplicate_refcodes_from_ase_databases_keep_their_names(tmp_path):
    (_, atoms), = list(read_crystals(pyxtal_cif("benzene")))
    db = ase.db.connect(str(tmp_path / "rows.json"))
    db.write(atoms, key_value_pairs={"NAME": "BENZEN"})
    db.write(atoms, key_value_pairs={"NAME": "BENZEN"})  # the same refcode twice
    db.write(atoms, data={"info": {"NAME": "BENZEN01"}})
    db.write(atoms)
    names = [name for name, _ in read_crystals(tmp_path / "rows.json")]
    assert names == ["BENZEN", "BENZEN", "BENZEN01", "rows_4"]
    store, summary = build_clusters_from_files([tmp_path / "rows.json"], tmp_path / "out", draws_per_crystal=1,
                                               num_workers=1, progress=False)
    assert summary.rejected == {"duplicate": 1} and sorted(set(store.crystals)) == ["BENZEN", "BENZEN01", "rows_4"]


# ------------------------------------------------------------------------------------------- planar molecules
def test_planar_molecules_build_and_train(tmp_path):
    from kflow.molecular.model.config import AssemblyModelConfig
    from kflow.molecular.workflow import train_assembly

    folder = tmp_path / "aromatics"
    folder.mkdir()
    for name in ("benzene", "naphthalene", "anthracene"):
        (folder / f"{name}.cif").write_bytes(pyxtal_cif(name).read_bytes())
    summary = RejectionSummary()
    from kflow.molecular.data.clusters import build_clusters

    clusters = list(build_clusters(read_crystals(folder), draws_per_crystal=2, summary=summary))
    assert summary.kept == 3 and not summary.rejected
    for cluster in clusters:
        body = cluster.final_positions.view(17, -1, 3)[0]
        extent = torch.linalg.eigvalsh(torch.cov(body.T.double()))
        assert extent[0] < 1e-3  # planar indeed
    store = write_cluster_store(clusters, tmp_path / "aromatics.lmdb")
    store = ClusterStore(store)
    config = AssemblyModelConfig(hidden_irreps="8x0e + 2x1o + 2x1e", num_molecule_layers=1)
    _, _, result = train_assembly(store, tmp_path / "run", config, steps=2, batch_size=2, progress=False)
    assert result["steps_run"] == 2 and np.isfinite(result["loss"])


# ------------------------------------------------------------------------------------------- caches
def test_folder_store_is_keyed_by_content(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("benzene", "naphthalene"):
        (folder / f"{name}.cif").write_bytes(pyxtal_cif(name).read_bytes())
    (folder / "broken.cif").write_text(EDGE_CASES["loop_row_with_extra_value"][0])  # never stops the build
    root = tmp_path / "data"
    first = load_assembly_dataset(str(folder), root, draws_per_crystal=2, progress=False)
    printed = capsys.readouterr().out
    assert len(first) == 4 and "kept 2, rejected 1" in printed and "unreadable" in printed  # also without progress
    report = json.loads(first.path.with_name(first.path.name.replace(".lmdb", ".summary.json")).read_text())
    assert report["files"][str(folder / "broken.cif")]["status"] == "error"
    again = load_assembly_dataset(str(folder), root, draws_per_crystal=2, progress=False)
    assert again.path == first.path and capsys.readouterr().out == ""  # cached: not rebuilt
    (folder / "anthracene.cif").write_bytes(pyxtal_cif("anthracene").read_bytes())  # a file added
    added = load_assembly_dataset(str(folder), root, draws_per_crystal=2, progress=False)
    assert added.path != first.path and len(added) == 6
    text = (folder / "benzene.cif").read_text()
    (folder / "benzene.cif").write_text(text.replace("C1 C -0.05690", "C1 C -0.05790"))  # a file changed
    changed = load_assembly_dataset(str(folder), root, draws_per_crystal=2, progress=False)
    assert changed.path not in (first.path, added.path)
    other = tmp_path / "elsewhere" / "mine"  # same folder name, other content
    other.mkdir(parents=True)
    (other / "benzene.cif").write_bytes(pyxtal_cif("benzene").read_bytes())
    assert len(load_assembly_dataset(str(other), root, draws_per_crystal=2, progress=False)) == 2
    assert load_assembly_dataset(str(folder), root, draws_per_crystal=3, progress=False).path != changed.path


def test_cod_store_follows_its_id_list(tmp_path):
    from testkit import make_cluster

    for i in range(6):
        write_cod_cluster17(make_cluster(i, atoms=4), tmp_path, f"{i:04d}")
    (tmp_path / "raw" / "subset_5k.txt").write_text("0000\n0001\n0002\n")
    assert len(CODCluster17Dataset(tmp_path, subset="5k", progress=False, download=False)) == 3
    (tmp_path / "raw" / "subset_5k.txt").write_text("0000\n0001\n0002\n0003\n")
    assert len(CODCluster17Dataset(tmp_path, subset="5k", progress=False, download=False)) == 4


# ------------------------------------------------------------------------------------------- transactional builds
def _write_inputs(folder: Path, names):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / f"{name}.cif").write_bytes(pyxtal_cif(name).read_bytes())


KILLED_BUILD = """
import sys, time
from pathlib import Path
import kflow.molecular.data.io as io
from kflow.molecular.data.sources import build_clusters_from_files
write = io.write_cod_cluster17
def slow(cluster, root, cid):
    out = write(cluster, root, cid)
    Path(sys.argv[3]).write_text(str(root))
    time.sleep(120)
    return out
io.write_cod_cluster17 = slow
build_clusters_from_files([sys.argv[1]], sys.argv[2], draws_per_crystal=2, num_workers=1, progress=False)
"""


def test_a_killed_build_leaves_the_previous_data_set_and_is_cleaned_up(tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    _write_inputs(inputs, ["benzene", "naphthalene"])
    build_clusters_from_files([inputs], out, draws_per_crystal=1, num_workers=1, progress=False)
    before = sorted(p.name for p in (out / "raw" / "FinalPositions").iterdir())
    assert len(before) == 2
    # a second build with more inputs, killed while it writes raw CSVs
    _write_inputs(inputs, ["anthracene"])
    ready = tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(inputs), str(out), str(ready)], env=env)
    try:
        deadline = time.time() + 120
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "the build did not start writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    staging = Path(ready.read_text()).resolve()
    assert staging.is_relative_to(tmp_path) and (staging / "raw" / "FinalPositions").is_dir()  # CSVs were written
    # ... but only into the hidden staging folder: the data set at out is the previous, complete one
    assert sorted(p.name for p in (out / "raw" / "FinalPositions").iterdir()) == before
    assert len(ClusterStore(out / "processed" / "clusters.lmdb")) == 2
    assert len(CODCluster17Dataset(out, subset="all", progress=False, download=False)) == 2
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.build-")]
    assert leftovers and not (tmp_path / "processed").exists()
    # the next build cleans the leftover, and a rebuild keeps no raw file of the older build
    _write_inputs(inputs, [])
    (inputs / "benzene.cif").unlink()
    build_clusters_from_files([inputs], out, draws_per_crystal=1, num_workers=1, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert sorted(p.name for p in (out / "raw" / "FinalPositions").iterdir()) == [
        "anthracene_draw0_cluster16.csv", "naphthalene_draw0_cluster16.csv"]
    assert json.loads((out / "summary.json").read_text())["kept"] == 2


def test_build_refuses_folders_it_did_not_write_and_stores_swap_atomically(tmp_path):
    inputs = tmp_path / "in"
    _write_inputs(inputs, ["benzene"])
    with pytest.raises(ValueError, match="inside the output folder"):
        build_clusters_from_files([inputs], inputs, num_workers=1, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="thesis.tex"):
        build_clusters_from_files([inputs], tmp_path / "notes", num_workers=1, progress=False)
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"
    # replacing a store: one atomic exchange (Linux), no moment without a store at the path
    from kflow.molecular.data import store as store_module

    calls = []
    exchange = store_module._exchange
    store_module_exchange = lambda a, b: calls.append((a, b)) or exchange(a, b)  # noqa: E731
    clusters = [build_cluster(a, name=n) for n, a in read_crystals(inputs)]
    path = write_cluster_store(clusters, tmp_path / "s.lmdb")
    try:
        store_module._exchange = store_module_exchange
        write_cluster_store(clusters * 2, path)
    finally:
        store_module._exchange = exchange
    if sys.platform.startswith("linux"):
        assert len(calls) == 1 and calls[0][1] == path
    assert len(ClusterStore(path)) == 2 and not [p for p in tmp_path.iterdir() if p.name.startswith(".s.lmdb")]
    # an exception inside a staged build leaves the previous folder untouched
    with pytest.raises(RuntimeError):
        with staged_folder(path) as new:
            new.mkdir()
            raise RuntimeError("killed")
    assert len(ClusterStore(path)) == 2
    # leftovers of dead processes and of older kflow versions go; those of live processes stay
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name in (f".s.lmdb.build-{dead.stdout.strip()}-x", ".s.lmdb.tmp-abc", f".s.lmdb.build-{os.getppid()}-y"):
        (tmp_path / name).mkdir()
    removed = sorted(p.name for p in clean_leftovers(path))
    assert removed == [f".s.lmdb.build-{dead.stdout.strip()}-x", ".s.lmdb.tmp-abc"]


# ------------------------------------------------------------------------------------------- AssembleFlow layout
def _assembleflow_cod(folder: Path, n: int = 12) -> Path:
    """A tiny COD/ folder exactly as AssembleFlow keeps it: raw/ CSV pairs, processed_5000|processed_10000/ with
    valid_idx.txt (one id per line) next to AssembleFlow's own processed tensors (which kflow ignores)."""
    from testkit import make_cluster

    cod = folder / "COD"
    ids = [str(1000000 + i) for i in range(n)]
    for i, cid in enumerate(ids):
        write_cod_cluster17(make_cluster(i, atoms=4), cod, cid)
    for size, chosen in (("5000", ids[:6]), ("10000", ids[:10])):
        (cod / f"processed_{size}").mkdir()
        (cod / f"processed_{size}" / "valid_idx.txt").write_text("\n".join(chosen) + "\n")
        (cod / f"processed_{size}" / "geometric_data_processed.pt").write_bytes(b"AssembleFlow tensors")
    return cod


def test_assembleflow_cod_folder_works_with_subsets_as_it_is(tmp_path, capsys):
    cod = _assembleflow_cod(tmp_path)
    assert cod_cluster17_ids(cod, "10k", download=False) == [str(1000000 + i) for i in range(10)]
    assert len(CODCluster17Dataset(cod, subset="5k", progress=False, download=False)) == 6
    assert len(load_assembly_dataset(str(cod), subset="10k", progress=False)) == 10
    assert len(load_assembly_dataset("cod", root=tmp_path, subset="10k", progress=False)) == 10  # data/COD
    sys.path.insert(0, str(SCRIPTS))
    import train_assembly

    train_assembly.main(["--dataset", str(cod), "--subset", "10k", "--steps", "1", "--batch-size", "2",
                         "--out", str(tmp_path / "run"), "--no-progress", "--hidden-irreps", "8x0e + 2x1o + 2x1e",
                         "--molecule-layers", "1"])
    assert "trained 1 steps" in capsys.readouterr().out
    (cod / "processed_10000" / "valid_idx.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        cod_cluster17_ids(cod, "10k", download=False)
    message = str(err.value)
    assert "processed_10000/valid_idx.txt" in message and "chao1224/CrystalFlow" in message
    assert "AssembleFlow" in message


def test_hub_download_fetches_only_what_kflow_reads(tmp_path, monkeypatch):
    from huggingface_hub.utils import filter_repo_objects

    hub = ["COD/raw/FinalPositions/1_cluster16.csv", "COD/raw/InitialPositions/1_cluster16_noised.csv",
           "COD/processed_5000/valid_idx.txt", "COD/processed_10000/valid_idx.txt",
           "COD/processed_5000/geometric_data_processed.pt", "COD/processed/geometric_data_processed.pt",
           "COD/processed_10000/processed_valid_idx.txt", "QM9/raw/x.csv"]
    assert list(filter_repo_objects(hub, allow_patterns=COD_HUB_PATTERNS)) == hub[:4]
    import huggingface_hub

    source = _assembleflow_cod(tmp_path / "hub_copy", n=3)

    def fake_snapshot(repo_id, repo_type, allow_patterns, local_dir):
        import shutil

        assert allow_patterns == COD_HUB_PATTERNS
        shutil.copytree(source, Path(local_dir) / "COD")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    root = tmp_path / "COD-Cluster17"
    assert len(cod_cluster17_ids(root, "10k")) == 3
    assert (root / "raw" / "FinalPositions").is_dir() and (root / "processed_5000" / "valid_idx.txt").is_file()
    assert len(CODCluster17Dataset(root, subset="5k", progress=False)) == 3
