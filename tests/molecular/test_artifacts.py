"""Run artifacts of the molecular domain: prediction files round-trip and refuse foreign data; names taken from
input files never place a file outside its folder; command-line argument types reject nonsense."""
import argparse

import numpy as np
import pytest
import torch

from kflow.molecular.artifacts import export_predictions, read_predictions, write_predictions
from kflow.molecular.data.io import cod_cluster17_paths, write_cod_cluster17
from kflow.utils.cli import positive_float, positive_int
from kflow.utils.io import safe_filename
from testkit import make_cluster

from testkit import ListDataset

HOSTILE_NAMES = ["../../../escape", "/abs/path", "..", "a/../../b", "x\x00y", "", "...hidden", "C:\\win\\x"]


def test_predictions_round_trip_and_foreign_files_are_refused(tmp_path):
    data = ListDataset([make_cluster(0, atoms=4, name="a"), make_cluster(1, atoms=6, name="b")])
    preds = [torch.randn(3, c.num_atoms, 3) for c in data.clusters]
    path = write_predictions(tmp_path / "p.npz", data, preds)
    back = read_predictions(path, data)
    assert all(torch.equal(x, y) for x, y in zip(back, preds))
    other = ListDataset([make_cluster(0, atoms=4, name="a"), make_cluster(1, atoms=6, name="c")])
    with pytest.raises(ValueError, match="do not match"):
        read_predictions(path, other)
    pickled = tmp_path / "evil.npz"
    np.savez(pickled, positions=np.zeros((1, 10, 3)), counts=np.array([4, 6]),
             names=np.array([object(), "b"], dtype=object))
    with pytest.raises(ValueError, match="evil.npz"):
        read_predictions(pickled, data)
    with pytest.raises(ValueError, match="2 clusters"):
        write_predictions(tmp_path / "short.npz", data, preds[:1])


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_names_from_inputs_stay_inside_the_output_folder(tmp_path, name):
    clean = safe_filename(name)
    assert clean and "/" not in clean and "\\" not in clean and not clean.startswith(".") and ".." not in clean
    out = tmp_path / "out"
    cluster = make_cluster(2, atoms=3, name=name)
    for path in write_cod_cluster17(cluster, out, name):
        assert path.resolve().is_relative_to(out.resolve()) and path.exists()
    assert all(p.resolve().is_relative_to(out.resolve()) for p in cod_cluster17_paths(out, name))
    [written] = export_predictions(out / "xyz", ListDataset([cluster]), [torch.zeros(1, cluster.num_atoms, 3)])
    assert written.resolve().parent == (out / "xyz").resolve()
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and not p.resolve().is_relative_to(out.resolve())) == []


def test_argument_types_reject_nonsense():
    assert positive_int("3") == 3 and positive_float("0.5") == 0.5
    for bad in ["0", "-1"]:
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)
    for bad in ["0", "-2", "nan", "inf"]:
        with pytest.raises(argparse.ArgumentTypeError):
            positive_float(bad)
