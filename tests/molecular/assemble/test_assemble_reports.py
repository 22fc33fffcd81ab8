"""What kflow assemble reports: ranks count from 1 everywhere (predictions' info, scores, samples.extxyz); progress
text is a line of its own when stderr is not a terminal, so an error line never runs into it; a prediction worse
than its start against the crystal says so (GASXON.cif: matched PM-center 2.59 Å > the start's 2.48); a place no
file can be written in (/sys) is refused before any work, for assemble and crystal."""
import os
from pathlib import Path

import ase.io
import pytest

from kflow.cli import main
from kflow.molecular.assemble import api
from kflow.molecular.assemble.api import against_start, assemble
from kflow.molecular.assemble.crystals import predict_crystals
from kflow.utils.io import check_writable_folder
from testkit import REPO, SDF


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_ranks_count_from_one_everywhere(tiny_model, tmp_path):
    result = assemble(str(SDF), model=tiny_model, samples=3, out=tmp_path / "run")
    assert [a.info["rank"] for a in result.predictions] == [s["rank"] for s in result.scores] == [1, 2, 3]
    assert [a.info["rank"] for a in result.starts] == [1, 2, 3]
    frames = ase.io.read(tmp_path / "run" / "samples.extxyz", index=":")
    assert [f.info["rank"] for f in frames] == [1, 2, 3]
    assert [f.info["sample"] for f in frames] == result.order


def test_progress_is_a_line_of_its_own_when_stderr_is_not_a_terminal(tiny_model, tmp_path, capsys, monkeypatch):
    assert main(["assemble", str(SDF), "--out", str(tmp_path / "run"), "--model", tiny_model, "--samples", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "kflow assemble: sampling\n" in err

    def fail(*args, **kwargs):
        raise ValueError("something the user did")
    monkeypatch.setattr(api, "_predict", fail)
    assert main(["assemble", str(SDF), "--out", str(tmp_path / "run2"), "--model", tiny_model]) == 1
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1] == "error: something the user did"


def test_a_prediction_worse_than_its_start_says_so():
    worse = against_start({"pm_center_matched": 2.59, "pm_atom_matched": 3.0},
                          {"pm_center_matched": 2.48, "pm_atom_matched": 3.1})
    assert worse["worse"] == ["pm_center_matched"]
    assert worse["text"].endswith("worse than its start against the crystal: PM-center matched 2.59 Å (start 2.48)")
    assert against_start({"pm_center_matched": 1.0, "pm_atom_matched": 1.0},
                         {"pm_center_matched": 2.0, "pm_atom_matched": 2.0})["worse"] == []


def test_a_crystal_prediction_reports_the_comparison(tiny_model, tmp_path, capsys):
    cif = REPO / "data" / "examples" / "GASXON.cif"
    assert main(["assemble", str(cif), "--out", str(tmp_path / "run"), "--model", tiny_model, "--samples", "1",
                 "--no-progress", "--no-relax"]) == 0
    text = capsys.readouterr().out
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["against_start"]["text"] in text
    assert summary["against_start"]["pm_center_matched"]["start"] == summary["start_metrics"]["pm_center_matched"]


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs /sys")
def test_a_place_no_file_can_be_made_in_is_refused_before_any_work(tiny_model, tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match="cannot write into /sys"):
        check_writable_folder("/sys/kernel/kflow_out")

    def refuse(*args, **kwargs):
        raise AssertionError("work started")
    monkeypatch.setattr(api, "_predict", refuse)
    monkeypatch.setattr("kflow.molecular.assemble.crystals.read_assembly_input", refuse)
    assert main(["assemble", str(SDF), "--out", "/sys/kernel/kflow_out", "--model", tiny_model]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write into /sys" in err[0]
    with pytest.raises(ValueError, match="cannot write into /sys"):
        predict_crystals(str(SDF), candidates=2, out="/sys/kernel/kflow_out")
