"""The user-facing assembly scripts end to end on a tiny COD-Cluster17 tree in the published raw format:
`train_assembly.py --subset 10k` -> `sample_assembly.py` (per-band steps, extxyz) -> `evaluate_assembly.py`."""
import json
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest

from kflow.molecular import InvalidCrystal, build_cluster, read_crystals, write_cod_cluster17
from kflow.molecular.data.sources import pyxtal_crystal_sources

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import evaluate_assembly  # noqa: E402
import sample_assembly  # noqa: E402
import train_assembly  # noqa: E402

SMALL_NET = ["--hidden-irreps", "8x0e + 2x1o + 2x1e", "--molecule-layers", "1"]


@pytest.fixture(scope="module")
def cod_root(tmp_path_factory):
    """data_root/COD-Cluster17/raw with 10 clusters from pyxtal crystals and a subset_10k.txt listing 10 ids."""
    root = tmp_path_factory.mktemp("data")
    cod = root / "COD-Cluster17"
    ids = []
    for name, atoms in read_crystals(pyxtal_crystal_sources()[0]):
        try:
            cluster = build_cluster(atoms, seed=len(ids), name=name)
        except InvalidCrystal:
            continue
        if cluster.num_atoms > 400:  # keep the test fast
            continue
        write_cod_cluster17(cluster, cod, str(len(ids)))
        ids.append(str(len(ids)))
        if len(ids) == 10:
            break
    (cod / "raw" / "subset_10k.txt").write_text("\n".join(ids) + "\n")
    return root


def test_train_sample_evaluate_through_the_scripts(cod_root, tmp_path, capsys):
    run = tmp_path / "run"
    train_assembly.main(["--subset", "10k", "--data-root", str(cod_root), "--steps", "3", "--batch-size", "2",
                         "--checkpoint-every", "2", "--out", str(run), "--no-progress", *SMALL_NET])
    assert "trained 3 steps" in capsys.readouterr().out
    checkpoint = run / "checkpoints" / "last.pt"
    assert checkpoint.exists() and (run / "metrics.jsonl").exists()

    preds = tmp_path / "pred.npz"
    common = ["--dataset", "cod", "--subset", "10k", "--data-root", str(cod_root)]
    sample_assembly.main(["--checkpoint", str(checkpoint), *common, "--method", "euler", "--steps-per-band", "2",
                          "1", "--repeats", "2", "--out", str(preds), "--extxyz-dir", str(tmp_path / "xyz")])
    data = np.load(preds)
    assert data["positions"].shape[0] == 2 and data["positions"].shape[1] == data["counts"].sum()
    assert np.isfinite(data["positions"]).all()
    frames = sorted((tmp_path / "xyz").glob("*_predicted.extxyz"))
    assert len(frames) == len(data["names"]) >= 1
    assert len(ase.io.read(frames[0])) == data["counts"][0]

    evaluate_assembly.main(["--predictions", str(preds), "--labels", "k2", *common, "--split", "test"])
    table = capsys.readouterr().out
    assert "identity" in table and "k2" in table
    results = json.loads(preds.with_suffix(".metrics.json").read_text())["summary"]
    assert set(results) == {"identity", "k2"} and results["k2"]["pm_atom"]["mean"] > 0

    # a per-band step count for the wrong number of bands is a clear error, and nothing is written
    with pytest.raises(ValueError, match="steps_per_band"):
        sample_assembly.main(["--checkpoint", str(checkpoint), *common, "--steps-per-band", "2", "2", "2",
                              "--out", str(tmp_path / "bad.npz")])
    assert not (tmp_path / "bad.npz").exists()


def test_scripts_report_user_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPTS / "train_assembly.py"), "--dataset",
                             str(tmp_path / "missing.cif"), "--data-root", str(tmp_path), "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: dataset")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("bad", [["--batch-size", "0"], ["--steps", "0"], ["--steps", "-1"],
                                 ["--checkpoint-every", "0"], ["--lr", "-1"], ["--resume", "--overwrite"]])
def test_nonsense_arguments_end_in_one_clear_line(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_assembly.main(["--dataset", "demo", *bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and bad[0] in err[0]


def test_retraining_into_a_used_run_folder_needs_resume_or_overwrite(cod_root, tmp_path, capsys):
    from kflow.utils.cli import run_main

    args = ["--subset", "10k", "--data-root", str(cod_root), "--steps", "2", "--batch-size", "2", "--out",
            str(tmp_path / "run"), "--no-progress", *SMALL_NET]
    train_assembly.main(args)
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train_assembly.main(args))
    assert "already holds a training run" in str(exit_info.value.code)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before
    capsys.readouterr()
    train_assembly.main(args[:5] + ["4"] + args[6:] + ["--resume"])
    assert "trained 2 steps (resumed at step 2, now at 4)" in capsys.readouterr().out
