"""`kflow crystal` and `predict_crystals` as a user runs them: files written together, scores against a crystal
input, a budget beyond the limit refused in one line before any work, a folder of other files refused."""
import json
from pathlib import Path

import pytest

from kflow.cli import main

EXAMPLES = Path(__file__).resolve().parents[3] / "data" / "examples"


def test_crystal_command_writes_ranked_cifs_scored_against_the_crystal(tmp_path, capsys, one_thread):
    out = tmp_path / "csp"
    assert main(["crystal", str(EXAMPLES / "GASXON.cif"), "--candidates", "4", "--keep", "2", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "4 candidates" in printed and "/15" in printed
    summary = json.loads((out / "summary.json").read_text())
    ranked = summary["ranked"]
    assert 1 <= len(ranked) <= 2 and [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    assert all(1 <= r["n_matched"] <= 15 and r["density"] > 0.5 for r in ranked)
    assert sorted(r["energy"] for r in ranked) == [r["energy"] for r in ranked]
    names = {p.name for p in out.iterdir()}
    assert {"summary.json", "landscape.png", "rank_01.cif", "rank_01_cluster.extxyz"} <= names
    assert summary["input_crystal"]["z"] == 4


def test_a_budget_above_the_limit_is_refused_before_any_work(tmp_path, capsys):
    assert main(["crystal", str(EXAMPLES / "GASXON.sdf"), "--candidates", "1000000", "--out",
                 str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "above the limit" in err and "CPU hours" in err
    assert not (tmp_path / "x").exists()


def test_an_out_folder_holding_other_files_is_refused(tmp_path, capsys):
    from kflow.molecular.assemble.crystals import check_out_folder

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write"):
        check_out_folder(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_molecule_above_the_atom_bound_is_refused_before_the_search(monkeypatch):
    from kflow.molecular.assemble import crystals

    monkeypatch.setattr(crystals, "search_crystals", lambda *a, **k: pytest.fail("the search ran"))
    with pytest.raises(ValueError, match="too_large"):  # C40H82: 122 atoms
        crystals.predict_crystals("C" * 40, candidates=10, progress=False)
