"""Issue 25: the object API of kflow assemble. ``assemble(x)`` takes an RDKit Mol (with or without a conformer),
an ASE Atoms (molecule or crystal), a pymatgen Structure or Molecule, a SMILES string or a path, and returns an
AssemblyResult whose predictions are ASE Atoms; ``.write`` / ``out=`` give the files of the path-based command;
names are the molecule's own; ``mirror="half"`` says whether the molecule is chiral; the CLI and Python share
their defaults; examples/assemble_objects.py runs."""
import inspect
import json
import runpy
import sys
from pathlib import Path

import ase
import ase.db
import ase.io
import numpy as np
import pytest
import torch

from kflow.cli import main
from kflow.molecular import read_crystals
from kflow.molecular.assemble.api import AssemblyResult, assemble
from kflow.molecular.assemble.inputs import InputError
from kflow.molecular.assemble.models import DEFAULT_MODEL, DEFAULT_SAMPLES, AssemblyModel, clear_model_cache
from kflow.molecular.assemble.readers import read_assembly_input
from kflow.molecular.commands import assemble_parser
from kflow.molecular.geometry import rigid_residuals
from kflow.molecular.assemble.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[3]
CIF, SDF = REPO / "data" / "examples" / "GASXON.cif", REPO / "data" / "examples" / "GASXON.sdf"
ALANINE = "C[C@H](N)C(=O)O"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _run(x, model, **kwargs) -> AssemblyResult:
    return assemble(x, model=model, **{"samples": 2, **kwargs})


def _gasxon_mol():
    from rdkit import Chem

    return Chem.MolFromMolFile(str(SDF), removeHs=False)


def _assert_rigid_copies(result: AssemblyResult, geometry: np.ndarray) -> None:
    """17 molecules per prediction, each a rigid motion (1e-4 Å) of ``geometry`` [P, 3] or of its mirror image."""
    ref = torch.from_numpy(np.asarray(geometry, dtype=np.float64))
    for atoms in result.predictions:
        mol_idx = atoms.get_array("mol_idx")
        assert mol_idx.max() == 16 and (np.bincount(mol_idx) == len(ref)).all() and (np.diff(mol_idx) >= 0).all()
        pred = torch.from_numpy(atoms.positions.reshape(17, -1, 3))
        same = rigid_residuals(ref.expand(17, -1, -1), pred)
        mirror = rigid_residuals((ref * torch.tensor([-1.0, 1.0, 1.0])).expand(17, -1, -1), pred)
        assert torch.minimum(same, mirror).max() < 1e-4


def _outputs(folder: Path) -> dict:
    """The files of a kflow assemble folder; summary.json without its timings (wall times differ run to run)."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name == "summary.json":
            summary = json.loads(path.read_text())
            summary.pop("timings")
            files[path.name] = summary
        else:
            files[path.name] = path.read_bytes()
    return files


# --------------------------------------------------------------------------------------------------- each input
def test_rdkit_mol_with_a_conformer_keeps_its_geometry_and_name(tiny_model):
    mol = _gasxon_mol()
    mol.SetProp("_Name", "7-acetoxycoumarin")
    result = _run(mol, tiny_model)
    assert isinstance(result, AssemblyResult) and result.input.kind == "molecule"
    assert result.name == "7-acetoxycoumarin" and result.summary["input"]["reader"] == "rdkit (Mol)"
    assert "7-acetoxycoumarin" in result.input.source and result.metrics is None and result.truth is None
    assert len(result.predictions) == 2 and all(isinstance(a, ase.Atoms) for a in result.predictions)
    assert result.predictions[0].info["name"] == "7-acetoxycoumarin"
    _assert_rigid_copies(result, mol.GetConformer().GetPositions())
    assert [s["rank"] for s in result.scores] == [1, 2] and [s["sample"] for s in result.scores] == result.order
    assert result.best is result.predictions[0] and result.files is None
    assert "7-acetoxycoumarin" in repr(result)


def test_rdkit_mol_without_a_3d_conformer_gets_one(tiny_model):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    graph = Chem.MolFromSmiles("c1ccccc1O")  # no conformer, implicit hydrogens
    result = _run(graph, tiny_model, samples=1)
    assert result.input.atomic_numbers.tolist().count(1) == 6 and result.name == "C6H6O"
    assert "no conformer" in result.notes[0] and any("ETKDG" in n for n in result.notes)
    assert graph.GetNumConformers() == 0 and graph.GetNumAtoms() == 7  # the caller's Mol is left as it was
    drawing = Chem.MolFromSmiles("c1ccccc1O")
    AllChem.Compute2DCoords(drawing)
    drawing.SetProp("_Name", "phenol")
    result = _run(drawing, tiny_model, samples=1)
    assert result.name == "phenol" and "2-D" in result.notes[0]
    assert len(result.input.atomic_numbers) == 13  # embedded with its hydrogens, not the drawing's 7 atoms


def test_ase_atoms_molecule(tiny_model):
    mol = _gasxon_mol()
    atoms = ase.Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()], positions=mol.GetConformer().GetPositions())
    before = atoms.copy()
    result = _run(atoms, tiny_model)
    assert result.input.kind == "molecule" and result.name == "C11H8O4"  # unnamed: its formula
    assert result.summary["input"]["reader"] == "ase (Atoms)"
    _assert_rigid_copies(result, atoms.positions)
    assert atoms == before and atoms.info == before.info
    atoms.info["refcode"] = "GASXON"
    assert _run(atoms, tiny_model, samples=1).name == "GASXON"


def test_ase_atoms_crystal_predicts_as_its_cif(tiny_model, tmp_path):
    name, crystal = next(read_crystals(CIF))
    crystal.info["name"] = name
    result = _run(crystal, tiny_model, out=tmp_path / "object")
    assert result.input.kind == "crystal" and result.name == "GASXON" and result.input.source == "ASE Atoms 'GASXON'"
    assert set(result.metrics) >= {"pm_atom", "pm_center_matched", "matched15", "rmsd15"} and result.start_metrics is not None
    assert isinstance(result.truth, ase.Atoms) and len(result.truth) == len(result.predictions[0])
    assert all("metrics" in s for s in result.scores) and result.metrics == result.scores[0]["metrics"]
    cell = result.input.molecules.positions
    for atoms in result.predictions:
        pred = torch.from_numpy(atoms.positions.reshape(17, -1, 3))
        residual = rigid_residuals(torch.from_numpy(cell)[None].expand(17, -1, -1, -1),
                                   pred[:, None].expand(-1, len(cell), -1, -1))
        assert residual.min(1).values.max() < 1e-4
    # the same crystal from its CIF: the same predictions and files; only where it came from differs
    assemble(CIF, model=tiny_model, samples=2, out=tmp_path / "path")
    obj, path = _outputs(tmp_path / "object"), _outputs(tmp_path / "path")
    for summary in (obj["summary.json"], path["summary.json"]):
        summary["input"].pop("source"), summary["input"].pop("reader")
    assert obj == path


def test_pymatgen_structure_and_molecule(tiny_model):
    from pymatgen.core import Molecule
    from pymatgen.io.ase import AseAtomsAdaptor

    crystal = next(read_crystals(CIF))[1]
    structure = AseAtomsAdaptor.get_structure(crystal)
    structure.properties["refcode"] = "GASXON"
    result = _run(structure, tiny_model, samples=1)
    assert result.input.kind == "crystal" and result.name == "GASXON"
    assert result.summary["input"]["reader"] == "pymatgen (Structure)" and np.isfinite(result.metrics["rmsd15_forced"]) and result.metrics["matched15"] >= 1
    mol = _gasxon_mol()
    molecule = Molecule([a.GetSymbol() for a in mol.GetAtoms()], mol.GetConformer().GetPositions())
    result = _run(molecule, tiny_model, samples=1)
    assert result.input.kind == "molecule" and result.name == "C11H8O4"
    assert result.summary["input"]["reader"] == "pymatgen (Molecule)"
    _assert_rigid_copies(result, molecule.cart_coords)
    with pytest.raises(InputError, match="disordered"):
        read_assembly_input(structure.copy().replace_species({"C": {"C": 0.5, "N": 0.5}}))


def test_smiles_is_detected_forced_and_named_by_formula(tiny_model, tmp_path, monkeypatch):
    result = _run("c1ccccc1O", tiny_model, samples=1)
    assert result.summary["input"]["smiles"] == "c1ccccc1O" and result.name == "C6H6O"
    assert result.predictions[0].info["name"] == "C6H6O"
    chiral = _run(ALANINE, tiny_model, samples=1)  # '@' is chirality here, not PATH@N
    assert chiral.summary["input"]["smiles"] == ALANINE and chiral.name == "C3H7NO2"
    assert _run("c1ccccc1O phenol", tiny_model, samples=1).name == "phenol"  # a name after the SMILES
    assert _run("c1ccccc1O", tiny_model, samples=1, name="phenol").name == "phenol"
    # an existing file wins over SMILES; smiles=True reads the string as SMILES all the same
    monkeypatch.chdir(tmp_path)
    Path("CCO").write_text("not a structure\n")
    with pytest.raises(InputError, match="^CCO: unreadable"):
        _run("CCO", tiny_model)
    assert _run("CCO", tiny_model, samples=1, smiles=True).summary["input"]["smiles"] == "CCO"
    with pytest.raises(FileNotFoundError, match="no such file .nor a SMILES"):
        _run("C1CC", tiny_model)  # an unclosed ring: neither a file nor SMILES


def test_path_and_selector(tiny_model, tmp_path):
    result = _run(SDF, tiny_model, samples=1)
    assert result.name == "GASXON" and result.summary["input"]["source"] == str(SDF)
    db = tmp_path / "crystals.db"
    with ase.db.connect(str(db)) as con:
        for refcode in ("GASXON", "GASXON_COPY"):
            con.write(next(read_crystals(CIF))[1], refcode=refcode)
    result = _run(f"{db}@1", tiny_model, samples=1)  # PATH@N: the 0-based position, in every format
    assert result.name == "GASXON_COPY" and result.input.kind == "crystal"
    assert _run(f"{db}@id=2", tiny_model, samples=1).name == "GASXON_COPY"  # the row id, as `ase db` lists it


# ------------------------------------------------------------------------------------- files, defaults, models
def test_write_and_out_give_the_files_of_the_path_based_command(tiny_model, tmp_path, capsys):
    for source, extra in ((SDF, []), (CIF, [])):
        cli, out, written = (tmp_path / f"{source.suffix[1:]}_{k}" for k in ("cli", "out", "write"))
        assert main(["assemble", str(source), "--out", str(cli), "--model", tiny_model, "--samples", "2",
                     "--no-progress", *extra]) == 0
        result = assemble(source, model=tiny_model, samples=2, out=out)
        assert result.files == json.loads((out / "summary.json").read_text())["files"] and result.folder == out
        later = assemble(source, model=tiny_model, samples=2)
        assert later.files is None and not written.exists()
        assert later.write(written) == result.files and later.summary["files"] == result.files
        assert _outputs(cli) == _outputs(out) == _outputs(written)
        # the predictions are the frames of samples.extxyz (best first), the best one is pred.extxyz
        frames = ase.io.read(written / "samples.extxyz", index=":")
        assert len(frames) == len(later.predictions) == 2
        for frame, atoms in zip(frames, later.predictions):
            assert np.allclose(frame.positions, atoms.positions, atol=1e-7)
            assert (frame.get_array("mol_idx") == atoms.get_array("mol_idx")).all()
            assert frame.info["sample"] == atoms.info["sample"] and frame.info["rank"] == atoms.info["rank"]
        assert np.allclose(ase.io.read(written / "pred.extxyz").positions, later.best.positions, atol=1e-7)
        assert np.allclose(ase.io.read(written / "start.extxyz").positions, later.starts[0].positions, atol=1e-7)
    capsys.readouterr()
    # a folder holding other files is refused before anything runs
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="notes.txt"):
        assemble(SDF, model=tiny_model, out=tmp_path / "mine")


def test_defaults_are_the_same_in_python_and_on_the_command_line():
    args = assemble_parser().parse_args(["molecule.sdf", "--out", "x"])
    params = inspect.signature(assemble).parameters
    assert DEFAULT_SAMPLES == params["samples"].default == args.samples == 8
    assert DEFAULT_MODEL == params["model"].default == args.model == "hard"
    for option in ("seed", "steps", "mirror"):
        assert params[option].default == getattr(args, option)
    assert params["out"].default is None and params["progress"].default is False
    assert all(p.kind == p.KEYWORD_ONLY for name, p in params.items() if name != "x")


def test_a_model_is_passed_or_loaded_once(tiny_model):
    clear_model_cache()
    first, again = AssemblyModel.load(tiny_model), AssemblyModel.load(tiny_model)
    assert first.net is again.net and first.path == again.path and first.name == tiny_model
    by_name = _run(SDF, tiny_model, samples=1)
    by_object = _run(SDF, first, samples=1)
    by_tuple = _run(SDF, load_pretrained(tiny_model), samples=1)
    for other in (by_object, by_tuple):
        assert np.array_equal(other.best.positions, by_name.best.positions)
    assert by_object.summary["model"]["name"] == tiny_model and by_tuple.summary["model"]["path"] is None
    with pytest.raises(TypeError, match="model must be"):
        _run(SDF, 3)


# ------------------------------------------------------------------------------------------------ mirror, errors
def test_mirror_half_says_whether_the_molecule_is_chiral(tiny_model, tmp_path, capsys):
    chiral = _run(ALANINE, tiny_model, samples=1, mirror="half")
    note = chiral.notes[-1]
    assert note.startswith("mirror half: 8 of the 17 copies are the mirror image") and "chiral" in note
    assert "enantiomer" in note and "C[C@@H](N)C(=O)O" in note and "mirror none" in note
    assert chiral.summary["start"]["mirrored_copies"] == 8
    achiral = _run(SDF, tiny_model, samples=1, mirror="half")
    assert "achiral" in achiral.notes[-1] and "enantiomer" not in achiral.notes[-1]
    assert not any("mirror half" in n for n in _run(ALANINE, tiny_model, samples=1).notes)
    # and the command line prints it
    assert main(["assemble", ALANINE, "--out", str(tmp_path / "ala"), "--model", tiny_model, "--samples", "1",
                 "--mirror", "half", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "note: mirror half" in captured.err and "enantiomer" in captured.err
    assert captured.out.startswith("C3H7NO2 (molecule")


def test_bad_inputs_end_in_one_line(tiny_model, tmp_path):
    from pymatgen.core import Molecule
    from rdkit import Chem

    cases = [(42, "unsupported_type"), (ase.Atoms(), "no_atoms"),
             (ase.Atoms("CH4", positions=np.eye(5, 3) * 1.1, cell=[5, 5, 0], pbc=[True, True, False]),
              "partly_periodic"),
             (Chem.MolFromSmiles("*CC*"), "polymeric"), (Chem.MolFromSmiles("[NH4+].[O-]C=O"), "multi_component"),
             (Molecule(["C", "O"], [[0, 0, 0], [1.2, 0, 0]]), "too_small"),
             (Chem.MolFromSmiles("Brc1ccccc1"), "unknown_element")]
    for x, reason in cases:
        with pytest.raises(InputError) as caught:
            _run(x, tiny_model)
        assert reason in str(caught.value) and "\n" not in str(caught.value), (x, caught.value)
    for kwargs in ({"samples": 0}, {"samples": "out"}, {"steps": 0}, {"mirror": "all"}):
        with pytest.raises(ValueError):
            assemble(SDF, model=tiny_model, **kwargs)
    with pytest.raises(TypeError):  # the old call assemble(source, out_dir): the options are keywords now
        assemble(SDF, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------- example
def test_example_script_predicts_from_objects_and_writes_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["assemble_objects.py", "--samples", "2", "--steps", "2", "--out", "objects"])
    namespace = runpy.run_path(str(REPO / "examples" / "assemble_objects.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "aspirin: " in printed and "BENZEN: " in printed and "C10H8: " in printed
    assert [p.name for p in tmp_path.iterdir()] == ["objects"]  # nothing but the one write
    summary = json.loads((tmp_path / "objects" / "summary.json").read_text())
    assert summary["input"]["name"] == "BENZEN" and summary["num_samples"] == 2 and "metrics" in summary
    for key in ("aspirin", "benzene", "naphthalene"):
        result = namespace[key]
        assert isinstance(result.predictions[0], ase.Atoms) and result.predictions[0].get_array("mol_idx").max() == 16


# ------------------------------------------------------------------------------------------------- relaxation
def test_samples_are_relaxed_ranked_by_contacts_then_energy_and_the_start_is_reported(tiny_model):
    relaxed = _run("c1ccccc1O", tiny_model, samples=3)
    raw = _run("c1ccccc1O", tiny_model, samples=3, relax=False)
    summary = relaxed.summary
    assert summary["relaxation"] is not None and raw.summary["relaxation"] is None
    keys = [(row["close_contacts"], row["mmff_energy"]) for row in relaxed.scores]  # best first
    assert keys == sorted(keys)
    for row in relaxed.scores:
        assert row["mmff_energy"] <= row["mmff_energy_before"] + 1e-6  # relaxation never raises the energy
    start = summary["start_scores"]
    assert start["close_contacts"] >= relaxed.scores[0]["close_contacts"] and "mmff_energy" in start
    # Raw samples carry no energies and the written molecules stay rigid copies of the input either way.
    assert "mmff_energy" not in raw.scores[0]
    geometry = relaxed.input.positions
    _assert_rigid_copies(relaxed, geometry)
    _assert_rigid_copies(raw, geometry)
    # Relaxing moved the random tiny model's clashing molecules apart: fewer contacts than the raw samples.
    assert sum(r["close_contacts"] for r in relaxed.scores) < sum(r["close_contacts"] for r in raw.scores)
