"""The molecular study's pieces (issue 10): start presets, the direct-regression baseline, paired statistics,
band-energy analysis, resumable cells and learning curves."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from kflow.molecular import Cluster, ClusterDataset, ClusterStore, write_cluster_store
from kflow.molecular.model.config import AssemblyModelConfig, build_assembly_model
from kflow.molecular.data.clusters import build_cluster
from kflow.molecular.data.crystals import read_crystals
from kflow.molecular.data.starts import NOISE_PRESETS, NoiseModel, noise_model
from kflow.molecular.model.flow import collate_clusters
from kflow.molecular.model.objective import AssemblyLoss
from kflow.molecular.model.sampling import sample_assembly
from kflow.molecular.data.sources import pyxtal_crystal_sources
from kflow.molecular.study import StudyBudget, StudyCell, band_energy_shares, paired_comparison, run_identity_cell
from kflow.molecular.workflow import first_clusters
from kflow.molecular.so3 import random_rotations
from kflow.utils.plots import plot_learning_curves, read_metrics_log

F64 = torch.float64


@pytest.fixture(scope="module")
def crystal():
    for name, atoms in read_crystals(pyxtal_crystal_sources()[0]):
        try:
            build_cluster(atoms, name=name)
        except Exception:
            continue
        return name, atoms
    raise AssertionError("no usable crystal in pyxtal's database")


def _molecules(cluster, which):
    m = cluster.num_molecules
    return getattr(cluster, which).double().reshape(m, -1, 3)


# ------------------------------------------------------------------------------------------------ start presets
@pytest.mark.parametrize("preset", sorted(NOISE_PRESETS))
def test_presets_are_seeded_reproducible_and_recorded(crystal, preset, tmp_path):
    name, atoms = crystal
    a = build_cluster(atoms, name=name, seed=3, draw=1, noise=preset)
    b = build_cluster(atoms, name=name, seed=3, draw=1, noise=preset)
    c = build_cluster(atoms, name=name, seed=3, draw=2, noise=preset)
    assert torch.equal(a.initial_positions, b.initial_positions)
    assert not torch.allclose(a.initial_positions, c.initial_positions)
    centred = lambda x: x - x.mean(0)  # noqa: E731 (both are centred on the start's centroid)
    assert torch.allclose(centred(a.final_positions), centred(c.final_positions), atol=1e-5)
    assert a.info["noise"] == asdict(NOISE_PRESETS[preset]) and a.info["noise"]["name"] == preset
    store = ClusterStore(write_cluster_store([a], tmp_path / "s.lmdb"))  # metadata survives the store
    assert store[0].info["noise"]["name"] == preset


@pytest.mark.parametrize("preset", sorted(NOISE_PRESETS))
def test_presets_move_molecules_rigidly(crystal, preset):
    name, atoms = crystal
    cl = build_cluster(atoms, name=name, noise=preset)
    start, final = _molecules(cl, "initial_positions"), _molecules(cl, "final_positions")
    d = lambda x: torch.cdist(x, x)  # noqa: E731
    assert torch.allclose(d(start), d(final), atol=1e-3)


def test_hard_start_is_independent_of_the_final_arrangement(crystal):
    """The hard start uses only the molecule and the crystal's density: two finals with the same molecules but
    different arrangements give the same start centroids (same seed), separated, molecule 0 at the centre and the
    others numbered by distance from it."""
    noise = NOISE_PRESETS["hard"]
    g = torch.Generator().manual_seed(0)
    body = torch.randn(5, 3, dtype=F64, generator=g)
    sites_a = torch.randn(17, 3, dtype=F64, generator=g) * 4
    sites_b = sites_a[torch.randperm(17, generator=g)] * 1.3 + 2.0  # other arrangement, other centre
    sites_b = sites_b - sites_b.mean(0) + sites_a.mean(0)  # same centre: the start sits at the final's centre
    rot = random_rotations(17, dtype=F64, generator=g)
    final_a = sites_a[:, None] + torch.einsum("mij,pj->mpi", rot, body)
    final_b = sites_b[:, None] + torch.einsum("mij,pj->mpi", rot, body)
    start_a = noise.apply(final_a, torch.Generator().manual_seed(7), volume_per_molecule=150.0)
    start_b = noise.apply(final_b, torch.Generator().manual_seed(7), volume_per_molecule=150.0)
    assert torch.allclose(start_a.mean(1), start_b.mean(1), atol=1e-9)
    centroids = start_a.mean(1)
    gaps = torch.cdist(centroids, centroids) + torch.eye(17, dtype=F64) * 1e9
    assert gaps.min() >= noise.min_separation * 150.0 ** (1 / 3) - 1e-9
    radius = (3 * 17 * 150.0 / (4 * np.pi)) ** (1 / 3)
    from_centre = (centroids - centroids.mean(0)).norm(dim=1)
    assert from_centre.max() <= 2 * radius
    # The central molecule 0 sits exactly at the final cluster's centre; the others are numbered by distance.
    assert torch.allclose(centroids[0], final_a.mean(1).mean(0), atol=1e-9)
    from_central = (centroids - centroids[0]).norm(dim=1)
    assert torch.equal(torch.argsort(from_central, stable=True), torch.arange(17))


def test_unknown_preset_and_preset_on_fixed_starts_are_refused(tmp_path, crystal):
    with pytest.raises(ValueError, match="unknown start preset 'wild'"):
        noise_model("wild")
    with pytest.raises(ValueError, match="placement"):
        NoiseModel(placement="grid")
    from kflow.molecular.workflow import load_assembly_dataset

    name, atoms = crystal
    store = write_cluster_store([build_cluster(atoms, name=name)], tmp_path / "s.lmdb")
    with pytest.raises(ValueError, match="built cluster store"):
        load_assembly_dataset(str(store), noise="hard")
    assert len(load_assembly_dataset(str(store), noise="mild")) == 1


# ---------------------------------------------------------------------------------------- direct regression
def _batch(crystal, n=2):
    name, atoms = crystal
    return collate_clusters([build_cluster(atoms, name=name, draw=k).to_data() for k in range(n)])


def test_regression_trains_at_t0_and_samples_its_one_step_prediction(crystal):
    torch.manual_seed(0)
    config = AssemblyModelConfig(num_bands=1, objective="regression")
    model, rigid = build_assembly_model(config)
    batch = _batch(crystal)
    loss_fn = AssemblyLoss(rigid)
    loss, _ = loss_fn(model, batch)
    loss_t0, _ = loss_fn(model, batch, t=torch.zeros(batch.num_clusters))
    assert torch.allclose(loss, loss_t0)
    model.eval()
    with torch.no_grad():
        z0 = batch.initial_chart()
        z1_hat = model(z0, torch.zeros(batch.num_clusters), batch=batch)
        expected = batch.positions_from_chart(z1_hat)
        got = sample_assembly(model, batch, rigid, steps=50, method="heun")[0]  # steps and method are ignored
    assert torch.allclose(got, expected, atol=1e-5)


def test_regression_config_needs_one_band():
    with pytest.raises(ValueError, match="num_bands must be 1"):
        AssemblyModelConfig(num_bands=2, objective="regression")
    with pytest.raises(ValueError, match="objective"):
        AssemblyModelConfig(objective="diffusion")
    assert AssemblyModelConfig.from_dict({"num_bands": 1}).objective == "flow"  # old configs: a flow


# ------------------------------------------------------------------------------------------- study helpers
def test_paired_comparison_counts_improvements_and_tests_them():
    rng = np.random.default_rng(0)
    base = rng.normal(5, 1, size=(3, 40))
    better = base - 0.5 + rng.normal(0, 0.1, size=(3, 40))
    c = paired_comparison(better.tolist(), base.tolist())
    assert c["improved"] > 0.95 and c["mean_diff"] == pytest.approx(-0.5, abs=0.05) and c["p"] < 1e-6
    same = paired_comparison(base.tolist(), base.tolist())
    assert same["improved"] == 0 and same["p"] == 1.0
    with pytest.raises(ValueError, match="same clusters"):
        paired_comparison(base[:, :10].tolist(), base.tolist())


def _cluster_with_motion(motion, name):
    """17 molecules on a grid; the final cluster = start + ``motion(start centroids)`` applied per molecule."""
    g = torch.Generator().manual_seed(1)
    body = torch.randn(4, 3, dtype=F64, generator=g)
    grid = torch.stack(torch.meshgrid(*[torch.arange(-1, 2, dtype=F64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sites = grid[torch.argsort(grid.norm(dim=-1), stable=True)][:17] * 6.0
    start = sites[:, None] + body
    final = start + motion(sites)[:, None]
    return Cluster(torch.tensor([6, 6, 8, 1]).repeat(17), torch.arange(17).repeat_interleave(4),
                   start.reshape(-1, 3), final.reshape(-1, 3), name)


def test_band_energy_shares_put_a_rigid_shift_in_band_zero(tmp_path):
    shift = _cluster_with_motion(lambda s: torch.tensor([1.0, -2.0, 0.5], dtype=F64).expand_as(s), "shift")
    ripple = _cluster_with_motion(lambda s: torch.stack([torch.cos(3 * s[:, 0]), torch.sin(2 * s[:, 1]),
                                                         torch.cos(s[:, 2])], -1), "ripple")
    store = ClusterStore(write_cluster_store([shift, ripple], tmp_path / "s.lmdb"))
    shares = band_energy_shares(ClusterDataset(store), 3)
    assert np.isclose(sum(shares["pooled"]), 1.0) and np.isclose(sum(shares["mean"]), 1.0)
    only_shift = band_energy_shares(first_clusters(ClusterDataset(store), 1), 3)
    assert only_shift["pooled"][0] == pytest.approx(1.0, abs=1e-6)
    assert shares["pooled"][0] < 1.0 - 1e-3  # the ripple puts energy into higher bands


def test_study_cells_are_saved_once_and_reloaded(tmp_path, crystal, monkeypatch):
    name, atoms = crystal
    clusters = [build_cluster(atoms, name=f"{name}{i}", draw=0) for i in range(12)]
    for i, c in enumerate(clusters):
        c.crystal = f"x{i}"
    store = ClusterStore(write_cluster_store(clusters, tmp_path / "s.lmdb"))
    cell = StudyCell("demo", "mild", "identity", 0, tmp_path / "out", tmp_path / "work")
    budget = StudyBudget(test_clusters=1)
    first = run_identity_cell(cell, store, budget)
    assert cell.result_path.is_file() and first["metrics"]["pm_center"]["per_cluster"]
    import kflow.molecular.study as study

    monkeypatch.setattr(study, "evaluate_assembly", lambda *a, **k: pytest.fail("a finished cell was recomputed"))
    assert run_identity_cell(cell, store, budget) == first
    assert len(first["test_names"]) == 1


def test_learning_curves_read_logs_and_write_a_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 30)]
    lines += [json.dumps({"step": 10, "eval_pm_center": 2.0}), json.dumps({"step": 20, "eval_pm_center": 1.5})]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3')  # killed mid-write
    records = read_metrics_log(run)
    assert len(records) == 31
    png = plot_learning_curves({"a": records}, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (run / "metrics.jsonl").write_text("not json\n" + lines[0] + "\n")
    with pytest.raises(ValueError, match="line 1"):
        read_metrics_log(run)
    with pytest.raises(FileNotFoundError, match="no metrics log"):
        read_metrics_log(tmp_path)


def test_a_model_result_saved_under_another_budget_is_refused(tmp_path):
    from dataclasses import asdict

    budget = StudyBudget(epochs=2)
    cell = StudyCell("demo", "mild", "K-Flow K=2", 0, tmp_path / "out", tmp_path / "work", budget=budget)
    cell.save({"kind": "model", "budget": asdict(budget)})
    assert cell.load()["budget"]["epochs"] == 2
    other = StudyCell("demo", "mild", "K-Flow K=2", 0, tmp_path / "out", tmp_path / "work",
                      budget=StudyBudget(epochs=3))
    with pytest.raises(ValueError, match=r"K-Flow_K_2_s0\.json: saved under another study budget \(epochs: 2 -> 3\)"):
        other.load()


def test_hands_cell_scores_a_finished_model_on_starts_with_lone_molecule_hands(tmp_path, crystal, monkeypatch):
    """The study row "tested on mirror none starts": the model cell's checkpoint sampled on the test starts rebuilt
    as kflow assemble builds a lone molecule's copies (every copy a proper rigid copy of molecule 0)."""
    import kflow.molecular.study as study
    from kflow.molecular.geometry import rigid_residuals

    name, atoms = crystal
    clusters = [build_cluster(atoms, name=f"{name}{i}", draw=i, noise="hard") for i in range(12)]
    for i, c in enumerate(clusters):
        c.crystal = f"x{i}"
    store = ClusterStore(write_cluster_store(clusters, tmp_path / "s.lmdb"))
    config = AssemblyModelConfig(num_bands=1, hidden_irreps="8x0e + 2x1o + 2x1e", num_molecule_layers=1,
                                 **study.GENERATIVE)
    model_cell = StudyCell("demo", "hard", "k1", 0, tmp_path / "out", tmp_path / "work")
    model, _ = build_assembly_model(config)
    model_cell.run_dir.mkdir(parents=True)
    torch.save(model.state_dict(), model_cell.run_dir / "best.pt")
    model_cell.save({"config": config.to_dict()})
    seen = []
    real = study.predict_assembly

    def spy(model, rigid, data, **kwargs):
        seen.extend(data.cluster(i) for i in range(len(data)))
        return real(model, rigid, data, **kwargs)

    monkeypatch.setattr(study, "predict_assembly", spy)
    cell = StudyCell("demo", "hard", "k1 on lone-molecule hands", 0, tmp_path / "out", tmp_path / "work")
    result = study.run_hands_cell(cell, model_cell, store, StudyBudget(test_clusters=2, sample_steps=2), "none")
    assert result["kind"] == "hands" and result["mirror"] == "none"
    assert result["test_names"] == [c.name for c in seen] and seen  # the test split, every cluster
    assert len(result["metrics"]["pm_center_perm"]["per_cluster"]) == len(seen)
    for c in seen:
        start = _molecules(c, "initial_positions")
        assert c.info["start_mirror"] == "none"
        assert rigid_residuals(start[:1].expand_as(start), start).max() < 1e-4  # one hand, one conformer
