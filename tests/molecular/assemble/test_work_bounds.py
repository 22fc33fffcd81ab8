"""Every count that multiplies the work of kflow assemble has a bound refused in one line before any work unless
--no-limit is given (``--samples 1000000`` once ran for what would have been weeks); seeds are checked when parsed
(``--seed 2**70`` once failed after the model had loaded), in the CLI and the API of assemble and crystal; the MMFF
relaxation bounds its own cost whatever a model's metadata says."""
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kflow.cli import main
from kflow.molecular.assemble import api
from kflow.molecular.assemble.api import assemble
from kflow.molecular.assemble.crystals import predict_crystals
from kflow.molecular.assemble.models import MAX_SAMPLES, MAX_STEPS, check_work
from kflow.molecular.physics.relax import MAX_RELAX_ATOMS, MAX_RELAX_STEPS, relax_cluster
from testkit import SDF, one_error_line


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any reading or prediction starts."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started")
    monkeypatch.setattr(api, "_predict", refuse)
    monkeypatch.setattr("kflow.molecular.assemble.crystals.read_assembly_input", refuse)


def test_a_million_samples_is_refused_at_once_with_a_time_estimate(tiny_model, tmp_path, capsys, no_work):
    t0 = time.perf_counter()
    assert main(["assemble", str(SDF), "--out", str(tmp_path / "x"), "--model", tiny_model,
                 "--samples", "1000000"]) == 1
    line = one_error_line(capsys)
    assert f"above the limit of {MAX_SAMPLES}" in line and " h, " in line and "--no-limit" in line
    assert main(["assemble", str(SDF), "--out", str(tmp_path / "x"), "--model", tiny_model,
                 "--steps", "100000"]) == 1
    assert f"above the limit of {MAX_STEPS}" in one_error_line(capsys)
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="samples=65 is above the limit"):
        assemble(str(SDF), model=tiny_model, samples=MAX_SAMPLES + 1)


def test_no_limit_lifts_the_bounds():
    check_work(MAX_SAMPLES + 1, MAX_STEPS + 1, no_limit=True)
    check_work(MAX_SAMPLES, MAX_STEPS)
    with pytest.raises(ValueError):
        check_work(MAX_SAMPLES, MAX_STEPS + 1)


@pytest.mark.parametrize("seed", [str(2 ** 70), "-1", str(2 ** 31)])
def test_seeds_out_of_range_are_refused_when_parsed(seed, tiny_model, tmp_path, capsys, no_work):
    for command in ("assemble", "crystal"):
        args = [command, str(SDF), "--out", str(tmp_path / "x"), "--seed", seed] + (
            ["--model", tiny_model] if command == "assemble" else [])
        assert main(args) == 2
        line = one_error_line(capsys)
        assert "--seed" in line and "[0, 2^31)" in line


@pytest.mark.parametrize("seed", [2 ** 70, -1, 1.5, True, np.int64(2 ** 40)])
def test_seeds_out_of_range_are_refused_by_the_api_before_any_work(seed, tiny_model, tmp_path, no_work):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\^31\)"):
        assemble(str(SDF), model=tiny_model, seed=seed, out=tmp_path / "x")
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\^31\)"):
        predict_crystals(str(SDF), seed=seed, out=tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_relaxation_bounds_its_own_cost_whatever_the_metadata():
    p = MAX_RELAX_ATOMS // 17 + 1  # 17 molecules just over the bound: refused before any force field is built
    z = torch.full((17 * p,), 6)
    x = torch.randn(17 * p, 3) * 30
    mol = torch.arange(17).repeat_interleave(p)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"the relaxation takes at most {MAX_RELAX_ATOMS}"):
        relax_cluster(z, x, mol)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ValueError, match=f"max_steps must be in 0..{MAX_RELAX_STEPS}"):
        relax_cluster(z[:34], x[:34], torch.arange(2).repeat_interleave(17), max_steps=MAX_RELAX_STEPS + 1)


def test_a_model_whose_metadata_allows_a_huge_molecule_is_not_relaxed_past_the_bound(monkeypatch):
    from kflow.molecular.assemble.predict import relax_samples
    from kflow.molecular.data.cluster import Cluster

    p = MAX_RELAX_ATOMS // 17 + 1
    z, mol = torch.full((17 * p,), 6), torch.arange(17).repeat_interleave(p)
    x = torch.randn(17 * p, 3, dtype=torch.float64) * 30
    cluster = Cluster(z, mol, x, x)
    positions, rows, start, note = relax_samples(x[None], [cluster])
    assert rows is None and note.startswith("not relaxed: ") and str(MAX_RELAX_ATOMS) in note
