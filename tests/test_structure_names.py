"""Issue 24, names: names that collide once made file-name safe (``X/1``, ``X:1``, ``X_1``, ``x_1``) got one file
for several clusters (11 clusters -> 8 raw CSVs, 8 extxyz files), and a newline or a backslash in a name (an ASE
db row) made extxyz files that could not be read back; ``PATH@N`` meant a 0-based position for an ASE ``.json``
database and a row id for a ``.db``, and the name shown was the file's, so nobody could notice."""
import json
from pathlib import Path

import ase.db
import ase.io
import pytest
import torch

from kflow.cli import main
from kflow.molecular import read_crystals
from kflow.molecular.artifacts import export_predictions
from kflow.molecular.assemble.inputs import InputError
from kflow.molecular.assemble.readers import read_assembly_input
from kflow.molecular.data.sources import build_clusters_from_files
from kflow.utils.io import printable_name, unique_filename
from testkit import ListDataset
from testkit import make_cluster
from testkit import SDF

REPO = Path(__file__).resolve().parents[1]
CIF = REPO / "data" / "examples" / "GASXON.cif"
COLLIDING = ["X/1", "X:1", "X_1", "x_1", "X 1", "X\n1", "X\\1"]  # one safe file name, or one on macOS/Windows


def test_unique_filenames_and_printable_names():
    taken = set()
    assert [unique_filename(n, taken) for n in COLLIDING] == ["X_1", "X_1-2", "X_1-3", "x_1-4", "X_1-5", "X_1-6",
                                                              "X_1-7"]
    assert unique_filename("X_1-2", taken) == "X_1-2-2"  # a real name that looks like a suffix
    assert unique_filename("a" * 500, taken) == "a" * 120 and unique_filename("a" * 500, taken) == "a" * 118 + "-2"
    assert printable_name('GAS"XON\n INJECTED=1\\') == "GAS'XON INJECTED=1/"
    assert printable_name("\n\t") == "unnamed"


def test_exported_predictions_get_one_readable_file_per_cluster(tmp_path):
    clusters = [make_cluster(k, atoms=3, name=f"{name}_draw0") for k, name in enumerate(COLLIDING)]
    paths = export_predictions(tmp_path / "xyz", ListDataset(clusters), [c.final_positions[None] for c in clusters])
    assert len({p.name.casefold() for p in paths}) == len(clusters) == len(list((tmp_path / "xyz").iterdir()))
    for cluster, path in zip(clusters, paths):
        atoms = ase.io.read(path)  # a raw newline or a backslash in the comment line made this fail
        assert atoms.info["name"] == printable_name(cluster.name) and "pbc" not in atoms.info["name"]
        assert torch.allclose(torch.from_numpy(atoms.positions).float(), cluster.final_positions)


def _rows(path: Path, names, deleted=()):
    crystal = next(read_crystals(CIF))[1]
    with ase.db.connect(str(path)) as con:
        for name in names:
            con.write(crystal, refcode=name)
    if deleted:
        ase.db.connect(str(path)).delete(list(deleted))
    return path


def test_a_cluster_build_keeps_one_raw_file_per_cluster_and_records_renames(tmp_path):
    db = _rows(tmp_path / "rows.db", COLLIDING)
    out = tmp_path / "built"
    store, _ = build_clusters_from_files([db], out, draws_per_crystal=1, num_workers=1, progress=False)
    assert len(store) == len(COLLIDING)
    for folder in ("FinalPositions", "InitialPositions"):
        assert len(list((out / "raw" / folder).iterdir())) == len(COLLIDING), folder  # was 1: all overwrote one
    renamed = json.loads((out / "summary.json").read_text())["renamed"]
    assert renamed["X:1_draw0"] == "X_1_draw0-2" and renamed["X\n1_draw0"] == "X_1_draw0-6"
    ids = {p.name.removesuffix("_cluster16.csv") for p in (out / "raw" / "FinalPositions").iterdir()}
    assert ids == {renamed.get(store[i].name, store[i].name) for i in range(len(store))}


@pytest.mark.parametrize("suffix", [".db", ".json"])
def test_path_at_n_is_the_position_in_every_multi_structure_file(tmp_path, suffix):
    db = _rows(tmp_path / f"rows{suffix}", ["ROW_A", "ROW_B", "ROW_C", "ROW_D"], deleted=[2])  # ids 1, 3, 4
    picked = read_assembly_input(f"{db}@1")
    assert picked.name == "ROW_C" and picked.source == f"{db}@1"  # .json@1 was ROW_C named 'rows', .db@1 refused
    assert read_assembly_input(f"{db}@id=3").name == "ROW_C"  # the row id, as `ase db` lists it
    assert read_assembly_input(f"{db}@0").name == "ROW_A"
    with pytest.raises(InputError, match=r"no row 3 \(the file holds 3 rows: 0\.\.2: 0 ROW_A, 1 ROW_C, 2 ROW_D\)"):
        read_assembly_input(f"{db}@3")
    with pytest.raises(InputError, match=r"no row with id 2 \(ids 1, 3, 4\)"):
        read_assembly_input(f"{db}@id=2")
    with pytest.raises(InputError, match=r"several_structures.*@N \(N one of 0\.\.2: 0 ROW_A"):
        read_assembly_input(str(db))


def test_path_at_n_counts_cif_blocks_and_sdf_records_the_same_way(tmp_path):
    text = CIF.read_text()
    (tmp_path / "two.cif").write_text(text + "\n" + text.replace("data_GASXON", "data_SECOND"))
    assert read_assembly_input(f"{tmp_path / 'two.cif'}@1").name == "SECOND"
    sdf = SDF.read_text()
    (tmp_path / "two.sdf").write_text(sdf + sdf.replace(sdf.splitlines()[0], "SECOND_MOL", 1))
    picked = read_assembly_input(f"{tmp_path / 'two.sdf'}@1")
    assert picked.name == "SECOND_MOL" and picked.source == f"{tmp_path / 'two.sdf'}@1"
    with pytest.raises(InputError, match="id= selects a row of an ASE database"):
        read_assembly_input(f"{tmp_path / 'two.sdf'}@id=1")


def test_the_chosen_rows_name_reaches_console_summary_and_outputs(tiny_model, tmp_path, capsys):
    db = _rows(tmp_path / "rascal.json", [f"ROW{k}" for k in range(8)])
    out = tmp_path / "out"
    assert main(["assemble", f"{db}@6", "--out", str(out), "--model", tiny_model, "--samples", "1",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("ROW6 ")  # was the file's name, 'rascal', and row 7's crystal
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["name"] == "ROW6" and summary["input"]["source"] == f"{db}@6"
    assert ase.io.read(out / "pred.extxyz").info["name"] == "ROW6" and "ROW6" in (out / "pred.pdb").read_text()
