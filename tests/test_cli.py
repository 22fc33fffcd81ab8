"""The `kflow` command (issue 11): `kflow assemble` on a crystal, a molecule file, SMILES and a database row with a
tiny random pretrained model (rigidity of every written molecule, the outputs, the ranking), bad inputs (one line,
exit status != 0, nothing written), the pretrained file format, `kflow train|sample|evaluate|plot` on a tiny store,
scripts/train_pretrained.py for a few steps, and `python -m kflow --help`."""
import json
import subprocess
import sys
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
import torch

from kflow.cli import main
from kflow.molecular import load_pretrained, read_crystals, write_cluster_store
from kflow.molecular.model.config import AssemblyModelConfig
from kflow.molecular.data.molecules import find_molecules
from kflow.molecular.geometry import rigid_residuals
from kflow.molecular.assemble.pretrained import list_pretrained, save_pretrained

from testkit import pyxtal_clusters

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "data" / "examples"
CIF, SDF = EXAMPLES / "GASXON.cif", EXAMPLES / "GASXON.sdf"
SMALL_NET = ["--hidden-irreps", "8x0e + 2x1o + 2x1e", "--molecule-layers", "1"]
MAX_ATOMS = 40


def _assemble(args, model):
    return main(["assemble", *args, "--model", model, "--no-progress"])


def _molecules(path):
    """(atomic numbers [M, P], positions [M, P, 3] float64) of an extxyz written by kflow assemble."""
    atoms = ase.io.read(path)
    mol = atoms.get_array("mol_idx")
    m = mol.max() + 1
    assert (np.bincount(mol) == len(atoms) // m).all() and (np.diff(mol) >= 0).all()
    return atoms.numbers.reshape(m, -1), torch.from_numpy(atoms.positions.reshape(m, -1, 3))


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


# ---------------------------------------------------------------------------------------------- kflow assemble
def test_assemble_crystal_writes_rigid_prediction_metrics_and_picture(tiny_model, tmp_path, capsys):
    out = tmp_path / "gasxon"
    assert _assemble([str(CIF), "--out", str(out), "--samples", "2"], tiny_model) == 0
    printed = capsys.readouterr().out
    assert "ranked first: sample" in printed and "against the crystal" in printed
    assert {p.name for p in out.iterdir()} == {"pred.extxyz", "pred.pdb", "start.extxyz", "samples.extxyz",
                                               "truth.extxyz", "summary.json", "cluster.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["kind"] == "crystal" and summary["input"]["name"] == "GASXON"
    assert set(summary["metrics"]) == {"pm_atom", "pm_center", "pm_atom_matched", "pm_center_matched", "matched15",
                                       "rmsd15", "rmsd15_forced", "collision_pct", "separation_pct"}
    assert 1 <= summary["metrics"]["matched15"] <= 15  # OXtalign: the centre always matches itself
    assert all(np.isfinite(v) for k, v in summary["metrics"].items() if k != "rmsd15" or v is not None)
    assert summary["metrics"]["pm_center_matched"] <= summary["metrics"]["pm_center"] + 1e-9
    ranks = sorted(summary["samples"], key=lambda s: s["rank"])
    assert ranks[0]["sample"] == summary["chosen_sample"]
    # ranked by contacts, then the MMFF energy of the relaxed samples (kflow assemble relaxes by default)
    assert [(s["close_contacts"], s["mmff_energy"]) for s in ranks] == sorted(
        (s["close_contacts"], s["mmff_energy"]) for s in ranks)
    # 17 molecules, each a rigid motion (within 1e-4 Å) of a molecule of the crystal read independently
    z, pred = _molecules(out / "pred.extxyz")
    assert pred.shape[0] == 17
    cell = find_molecules(next(read_crystals(CIF))[1])
    assert (z == cell.atomic_numbers).all()
    crystal = torch.from_numpy(cell.positions)  # [Z, P, 3]
    residual = rigid_residuals(crystal[None].expand(17, -1, -1, -1), pred[:, None].expand(-1, len(crystal), -1, -1))
    assert residual.min(1).values.max() < 1e-4
    pdb = (out / "pred.pdb").read_text().splitlines()
    atoms = [ln for ln in pdb if ln.startswith("HETATM")]
    assert len(atoms) == z.size and len({ln[21] for ln in atoms}) == 17 and len({ln[22:26] for ln in atoms}) == 17
    assert (out / "cluster.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_assemble_molecule_file_with_mirrored_copies(tiny_model, tmp_path):
    out = tmp_path / "mol"
    assert _assemble([str(SDF), "--out", str(out), "--samples", "2", "--mirror", "half", "--seed", "3"],
                     tiny_model) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["kind"] == "molecule" and "metrics" not in summary and not (out / "truth.extxyz").exists()
    assert summary["start"]["mirror"] == "half" and summary["start"]["mirrored_copies"] == 8
    assert 200 < summary["start"]["volume_per_molecule"] < 280  # GASXON's crystal: 230 Å³ per molecule
    from rdkit import Chem

    mol = Chem.MolFromMolFile(str(SDF), removeHs=False)
    geometry = torch.tensor(mol.GetConformer().GetPositions())
    mirror = geometry * torch.tensor([-1.0, 1.0, 1.0])
    z, pred = _molecules(out / "pred.extxyz")
    assert (z == [a.GetAtomicNum() for a in mol.GetAtoms()]).all()
    as_input = rigid_residuals(geometry.expand(17, -1, -1), pred)
    as_mirror = rigid_residuals(mirror.expand(17, -1, -1), pred)
    assert torch.minimum(as_input, as_mirror).max() < 1e-4
    assert int((as_mirror < 1e-4).sum()) == 8 and int((as_input < 1e-4).sum()) == 9
    assert len(ase.io.read(out / "samples.extxyz", index=":")) == 2


def test_assemble_smiles(tiny_model, tmp_path):
    out = tmp_path / "benzene"
    assert main(["assemble", "--smiles", "c1ccccc1", "--out", str(out), "--model", tiny_model, "--samples", "1",
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["smiles"] == "c1ccccc1" and summary["input"]["atoms_per_molecule"] == 12
    z, pred = _molecules(out / "pred.extxyz")
    assert pred.shape == (17, 12, 3) and sorted(z[0]) == [1] * 6 + [6] * 6
    residual = rigid_residuals(pred[:1].expand(17, -1, -1), pred)  # planar: mirror images are rotations too
    assert residual.max() < 1e-4


def test_assemble_database_row_and_rerun_into_the_same_folder(tiny_model, tmp_path, capsys):
    db = tmp_path / "crystals.db"
    crystal = next(read_crystals(CIF))[1]
    with ase.db.connect(str(db)) as con:
        con.write(crystal, refcode="GASXON")
        con.write(crystal, refcode="GASXON_COPY")
    out = tmp_path / "row"
    assert _assemble([str(db), "--out", str(out)], tiny_model) == 1
    line = _one_error_line(capsys)
    assert str(db) in line and "several_structures" in line and "@N" in line and not out.exists()
    assert _assemble([f"{db}@1", "--out", str(out), "--samples", "1"], tiny_model) == 0  # 0-based, as ase.io.read
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["name"] == "GASXON_COPY" and summary["input"]["source"] == f"{db}@1"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a failing run leaves the earlier output as it was; a folder with other files is refused
    assert main(["assemble", "--smiles", "Brc1ccccc1", "--out", str(out), "--model", tiny_model]) == 1
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert _assemble([str(SDF), "--out", str(tmp_path / "mine")], tiny_model) == 1
    assert "notes.txt" in _one_error_line(capsys)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def _salt_xyz(path):
    """Ammonium formate: two fragments 4 Å apart."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("[NH4+].[O-]C=O"))
    AllChem.EmbedMolecule(mol, randomSeed=1)
    pos = mol.GetConformer().GetPositions()
    first = list(Chem.GetMolFrags(mol)[0])
    pos[first] += np.delete(pos, first, 0).mean(0) + [4.0, 0, 0] - pos[first].mean(0)
    symbols = [a.GetSymbol() for a in mol.GetAtoms()]
    path.write_text(f"{len(symbols)}\nammonium formate\n" + "".join(f"{s} {x:.4f} {y:.4f} {w:.4f}\n"
                                                                    for s, (x, y, w) in zip(symbols, pos)))


def _polymer_extxyz(path):
    """Polyethylene: a CH2 chain bonded through the periodic cell along a."""
    from ase import Atoms

    pos = [(0, 0, 0), (1.275, 0.8, 0), (0, -0.63, 0.89), (0, -0.63, -0.89), (1.275, 1.43, 0.89), (1.275, 1.43, -0.89)]
    atoms = Atoms("C2H4", positions=np.array(pos) + [0, 3, 3], cell=[2.55, 8, 8], pbc=True)
    ase.io.write(path, atoms, format="extxyz")


@pytest.mark.parametrize("case, reason", [
    ("missing", "no such file"), ("garbage", "unreadable"), ("salt", "multi_component"), ("polymer", "polymeric"),
    ("smiles_polymer", "polymeric"), ("unknown_element", "unknown_element"), ("too_large", "too_large"),
    ("two_molecules", "several_structures")])
def test_bad_inputs_end_in_one_line_and_write_nothing(case, reason, tiny_model, tmp_path, capsys):
    source = tmp_path / f"{case}.xyz"
    args = [str(source)]
    if case == "garbage":
        source.write_text("this is not\na molecule\n")
    elif case == "salt":
        _salt_xyz(source)
    elif case == "polymer":
        source = tmp_path / "polymer.extxyz"
        _polymer_extxyz(source)
        args = [str(source)]
    elif case == "smiles_polymer":
        args, source = ["--smiles", "*CC(C)*"], "*CC(C)*"
    elif case == "unknown_element":
        args, source = ["--smiles", "Brc1ccccc1"], "Brc1ccccc1"
    elif case == "too_large":
        args, source = ["--smiles", "C" * 14], "C" * 14  # 44 atoms > 40
    elif case == "two_molecules":
        source = tmp_path / "two.sdf"
        source.write_text(SDF.read_text() * 2)
        args = [str(source)]
    out = tmp_path / "out"
    assert _assemble([*args, "--out", str(out)], tiny_model) == 1
    line = _one_error_line(capsys)
    assert str(source) in line and reason in line
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- pretrained files
def test_pretrained_files_round_trip_and_fail_clearly(tiny_model, tmp_path):
    model, rigid, meta = load_pretrained(tiny_model)
    assert meta["preset"] == "hard" and meta["max_atoms"] == MAX_ATOMS and not model.training
    assert (Path(tiny_model).stat().st_mode & 0o444) == 0o444  # a file to ship is readable by everyone
    with pytest.raises(FileNotFoundError, match="no pretrained model named 'nonexistent'"):
        load_pretrained("nonexistent")
    assert isinstance(list_pretrained(), list)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(Path(tiny_model).read_bytes()[:500])
    with pytest.raises(ValueError, match=f"{corrupt}: corrupt"):
        load_pretrained(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(ValueError, match=f"{foreign}: not a kflow pretrained model .*training checkpoint"):
        load_pretrained(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "kflow-pretrained", "payload": Path("/")}, pickled)  # an object: refused unexecuted
    with pytest.raises(ValueError, match=f"{pickled}: not a kflow pretrained model"):
        load_pretrained(pickled)
    with pytest.raises(ValueError, match="lacks preset"):
        save_pretrained(tmp_path / "x.pt", model, AssemblyModelConfig(), {"mirror": "none"})
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------- train, sample, evaluate, plot
@pytest.fixture(scope="module")
def tiny_stores(tmp_path_factory):
    """Two cluster stores of small pyxtal crystals: 10 crystals and 4 others."""
    root = tmp_path_factory.mktemp("stores")
    clusters = pyxtal_clusters(14)
    return (str(write_cluster_store(clusters[:10], root / "main")),
            str(write_cluster_store(clusters[10:], root / "extra")))


def test_train_sample_evaluate_plot(tiny_stores, tmp_path, capsys):
    store = tiny_stores[0]
    run = tmp_path / "run"
    assert main(["train", "--dataset", store, "--steps", "2", "--batch-size", "2", "--out", str(run),
                 "--no-progress", *SMALL_NET]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    preds = tmp_path / "pred.npz"
    assert main(["sample", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--dataset", store, "--split",
                 "test", "--steps", "2", "--out", str(preds), "--no-progress"]) == 0
    assert main(["evaluate", "--predictions", str(preds), "--labels", "tiny", "--dataset", store, "--split", "test",
                 "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "identity" in table and "tiny" in table and preds.with_suffix(".metrics.json").exists()
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path / "nothing")]) == 1
    assert "no metrics log" in _one_error_line(capsys)


@pytest.mark.parametrize("command", ["assemble", "train", "sample", "evaluate", "plot"])
def test_every_command_has_help_with_an_example(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"kflow {command}" in text and "xample" in text


def test_train_pretrained_script_packages_a_model(tiny_stores, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import train_pretrained

    out = tmp_path / "mild.pt"
    train_pretrained.main(["--preset", "mild", "--datasets", *tiny_stores, "--data-root", str(tmp_path),
                           "--out", str(out), "--work", str(tmp_path / "work"), "--steps", "2", "--evals", "1",
                           "--val-clusters", "1", "--sample-steps", "2", "--no-progress", *SMALL_NET])
    assert f"wrote {out}" in capsys.readouterr().out
    _, _, meta = load_pretrained(out)
    assert meta["preset"] == "mild" and meta["mirror"] == "none" and meta["command"].startswith(
        "python scripts/train_pretrained.py --preset mild")
    assert meta["data"]["train_clusters"] == 8 + 4 and meta["data"]["held_out"]["dataset"] == tiny_stores[0]
    assert meta["test_metrics"]["clusters"] == 1 and "pm_center_perm" in meta["test_metrics"]["model"]
    assert 6 in meta["elements"] and meta["max_atoms"] >= 3


def test_train_pretrained_on_one_data_set_reproduces_the_study_cell(tiny_stores, tmp_path):
    """With the study's data set alone, the packaged model is the study's cell: same split, budget, selection and
    test metrics (so a shipped model can be checked against the study's row)."""
    from kflow.molecular.pretraining import train_pretrained
    from kflow.molecular.data.store import ClusterStore
    from kflow.molecular.study import StudyBudget, StudyCell, run_model_cell

    config = AssemblyModelConfig(hidden_irreps="8x0e + 2x1o + 2x1e", num_molecule_layers=1)
    budget = StudyBudget(epochs=1, evals=1, val_clusters=1, sample_steps=2)
    cell = run_model_cell(StudyCell("tiny", "mild", "k2", 0, tmp_path / "study", tmp_path / "work", config),
                          ClusterStore(tiny_stores[0]), budget, log=lambda *_: None)
    meta = train_pretrained(tmp_path / "m.pt", config, preset="mild", datasets=[tiny_stores[0]], root=tmp_path,
                            work=tmp_path / "pre", epochs=1, evals=1, val_clusters=1, sample_steps=2, progress=False,
                            log=lambda *_: None)
    assert meta["training"]["steps"] == cell["steps"] and meta["training"]["best_step"] == cell["best_step"]
    for metric, value in cell["metrics"].items():
        assert meta["test_metrics"]["model"][metric]["mean"] == pytest.approx(value["mean"], abs=1e-5), metric


def test_python_dash_m_kflow_help():
    result = subprocess.run([sys.executable, "-m", "kflow", "--help"], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode == 0 and "assemble" in result.stdout and "kflow assemble" in result.stdout
