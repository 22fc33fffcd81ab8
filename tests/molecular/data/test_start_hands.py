"""Handedness of the start copies (``start_mirror``): starts with the hands ``kflow assemble`` gives a lone molecule,
collation that pairs a start copy with a crystal copy of the other hand, and the recipe, study rows and pretrained
metadata that carry the choice."""
import pytest
import torch

from kflow.molecular.data.cluster import Cluster
from kflow.molecular.model.config import AssemblyModelConfig
from kflow.molecular.data.starts import NOISE_PRESETS
from kflow.molecular.data.datasets import START_MIRRORS, StartHands, set_start_hands
from kflow.molecular.model.flow import RigidityError, collate_clusters
from kflow.molecular.geometry import masked_centroids, rigid_residuals
from kflow.molecular.so3 import random_rotations

F64 = torch.float64
M, P = 17, 4
# A non-planar 4-atom molecule: its atom-ordered mirror image is no rotation of it (the signed volume flips).
BODY = torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [0.0, 1.2, 0.0], [0.3, 0.2, 0.9]], dtype=F64)
BODY = BODY - BODY.mean(0)
CRYSTAL_MIRRORED = torch.arange(M) % 3 == 1  # the crystal's other-hand copies (not the "half" pattern)
TINY = dict(hidden_irreps="8x0e + 4x1o + 4x1e", num_molecule_layers=1)


def _racemic_cluster(seed=0, name="rac"):
    """17 copies of BODY, x -> −x for CRYSTAL_MIRRORED, on a lattice (molecule 0 central); the start moves each
    crystal copy by a random proper motion (so it keeps the crystal's hand), molecule 0 at the start's centre."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(-1, 2, dtype=F64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sites = grid[torch.argsort(grid.norm(dim=-1), stable=True)][:M] * 4.5  # [M, 3] centre first
    copies = BODY.expand(M, P, 3).clone()
    copies[CRYSTAL_MIRRORED, :, 0] *= -1
    final = torch.einsum("mij,mpj->mpi", random_rotations(M, dtype=F64, generator=g), copies) + sites[:, None]
    centres = 1.4 * sites + 0.4 * torch.randn(M, 3, generator=g, dtype=F64) * (torch.arange(M) > 0)[:, None]
    local = final - final.mean(1, keepdim=True)
    start = torch.einsum("mij,mpj->mpi", random_rotations(M, dtype=F64, generator=g), local) + centres[:, None]
    cluster = Cluster(torch.tensor([6, 7, 8, 1]).repeat(M), torch.arange(M).repeat_interleave(P),
                      start.reshape(-1, 3), final.reshape(-1, 3), f"{name}_{seed}", name)
    cluster.info.update(noise={**NOISE_PRESETS["hard"].__dict__}, volume_per_molecule=90.0)
    return cluster


def _molecules(x):
    return x.double().reshape(M, P, 3)


def _residuals(reference, copies):
    """[M] RMS residual of the best proper fit of ``reference`` [P, 3] onto each of ``copies`` [M, P, 3]."""
    return rigid_residuals(reference.expand_as(copies), copies)


# ------------------------------------------------------------------------------------------------ set_start_hands
@pytest.mark.parametrize("mirror", ["none", "half"])
def test_start_hands_keep_the_centroids_and_the_crystal(mirror):
    cluster = _racemic_cluster()
    out = set_start_hands(cluster, mirror)
    assert torch.equal(out.final_positions, cluster.final_positions)
    assert torch.allclose(_molecules(out.initial_positions).mean(1), _molecules(cluster.initial_positions).mean(1),
                          atol=1e-5)
    assert out.info["start_mirror"] == mirror and "start_mirror" not in cluster.info
    assert set_start_hands(cluster, "crystal") is cluster
    with pytest.raises(ValueError, match="start mirror"):
        set_start_hands(cluster, "racemic")


def test_none_makes_every_copy_a_rigid_copy_of_molecule_zero():
    cluster = _racemic_cluster(1)
    stored = _molecules(cluster.initial_positions)
    start = _molecules(set_start_hands(cluster, "none").initial_positions)
    assert _residuals(start[0], start).max() < 1e-4
    assert _residuals(stored[0], stored)[CRYSTAL_MIRRORED].min() > 0.1  # the crystal's hands were mixed
    # Copies whose hand already agreed are reproduced; the others keep their centroid and turn as little as possible.
    assert (start[~CRYSTAL_MIRRORED] - stored[~CRYSTAL_MIRRORED]).abs().max() < 1e-4
    assert (start[CRYSTAL_MIRRORED] - stored[CRYSTAL_MIRRORED]).abs().max() > 0.1


def test_half_mirrors_the_odd_copies_as_kflow_assemble_does():
    from kflow.molecular.assemble.starts import mirrored_copies

    start = _molecules(set_start_hands(_racemic_cluster(2), "half").initial_positions)
    odd = torch.from_numpy(mirrored_copies("half", M))
    assert torch.equal(odd, torch.arange(M) % 2 == 1) and int(odd.sum()) == 8
    proper, improper = _residuals(start[0], start), _residuals(-start[0], start)
    assert proper[~odd].max() < 1e-4 and improper[odd].max() < 1e-4
    assert proper[odd].min() > 0.1 and improper[~odd].min() > 0.1
    assert START_MIRRORS[1:] == ("none", "half")


def test_start_hands_view_passes_the_data_set_through():
    class Data:
        store = "the store"
        crystals = ["a", "b"]
        epochs = []

        def __len__(self):
            return 2

        def cluster(self, i):
            return _racemic_cluster(i)

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    inner = Data()
    view = StartHands(inner, "none")
    view.set_epoch(3)
    assert len(view) == 2 and view.store == "the store" and view.crystals == ["a", "b"] and inner.epochs == [3]
    item = view[1]
    assert torch.equal(item.initial_positions, set_start_hands(_racemic_cluster(1), "none").initial_positions)
    assert view.cluster(0).info["start_mirror"] == "none"
    with pytest.raises(ValueError, match="start mirror"):
        StartHands(inner, "both")


def test_redrawn_starts_take_the_hands_after_the_redraw():
    from testkit import ToyView

    from kflow.molecular.data.datasets import RedrawnStarts, redraw_start

    View = lambda: ToyView(_racemic_cluster, [0, 5])  # noqa: E731
    plain, half = RedrawnStarts(View(), seed=1), RedrawnStarts(View(), seed=1, mirror="half")
    expected = set_start_hands(plain.cluster(1), "half")
    assert torch.equal(half.cluster(1).initial_positions, expected.initial_positions)
    # A start drawn again from a cluster with set hands has the crystal's hands, and says so.
    assert "start_mirror" not in redraw_start(expected, "hard", 4).info


# ------------------------------------------------------------------------------------------------------ collation
@pytest.mark.parametrize("coupling", ["index", "ot", "eot"])
def test_opposite_hand_pairs_collate_to_the_nearest_proper_pose(coupling):
    cluster = set_start_hands(_racemic_cluster(3), "none")
    with pytest.raises(RigidityError, match="molecule 1"):
        collate_clusters([cluster], dtype=F64, coupling=coupling, central=True)
    batch = collate_clusters([cluster], dtype=F64, coupling=coupling, central=True, free_pairs=True)
    final = batch.final_positions()[0]  # [M, P, 3] the path's targets
    body = batch.body[0]
    assert torch.allclose(torch.det(batch.final_rotations[0]), torch.ones(M, dtype=F64), atol=1e-9)
    assert rigid_residuals(body, final).max() < 1e-6  # proper poses of the start bodies
    assert torch.allclose(masked_centroids(final, batch.mask[0]), batch.final_translations[0], atol=1e-9)
    crystal = _molecules(cluster.final_positions)
    truth = crystal.mean(1)  # [M, 3] crystal centroids
    if coupling == "eot":  # the crystal moved rigidly: the centroid distances are kept
        d = lambda x: torch.cdist(x, x).flatten().sort().values  # noqa: E731
        assert torch.allclose(d(batch.final_translations[0]), d(truth), atol=1e-6)
        assert torch.allclose(batch.final_translations[0, 0], batch.initial_translations[0, 0], atol=1e-6)
        return
    # Each target centroid is the centroid of its coupled crystal molecule (a relabelling for "ot").
    match = torch.cdist(batch.final_translations[0], truth)  # [M, M]
    assert match.min(1).values.max() < 1e-6 and match.argmin(1).unique().numel() == M
    if coupling == "index":  # same-hand pairs reach the crystal atoms, mirror-image pairs cannot
        miss = (final - crystal).square().sum(-1).mean(-1).sqrt()  # [M]
        assert miss[~CRYSTAL_MIRRORED].max() < 1e-6 and miss[CRYSTAL_MIRRORED].min() > 0.1


def test_a_crystal_copy_of_another_conformer_is_targeted_at_the_nearest_proper_pose():
    """Crystals with several independent molecules hold other conformers (10 % of CSD-500): a start made from
    molecule 0 pairs with them, and the target is the best proper fit of the start body, at the copy's centroid."""
    cluster = set_start_hands(_racemic_cluster(4), "none")
    final = cluster.final_positions.clone()
    final[5 * P + 2] += torch.tensor([0.5, 0.0, 0.0])  # molecule 5 another conformer
    bent = Cluster(cluster.atomic_numbers, cluster.molecule_index, cluster.initial_positions, final, "bent")
    with pytest.raises(RigidityError, match="'bent', molecule 1"):  # the crystal's hands: refused without
        collate_clusters([bent])
    batch = collate_clusters([bent], dtype=F64, free_pairs=True)
    target = batch.final_positions()[0]
    assert rigid_residuals(batch.body[0], target).max() < 1e-6
    assert torch.allclose(batch.final_translations[0, 5], _molecules(final)[5].mean(0).double(), atol=1e-5)


def test_free_pairs_changes_nothing_for_index_pairs_of_the_same_hand():
    cluster = _racemic_cluster(5)  # the crystal's own hands: every index pair is proper (what sampling collates)
    a, b = collate_clusters([cluster], dtype=F64), collate_clusters([cluster], dtype=F64, free_pairs=True)
    for name in ("body", "final_translations", "final_rotations", "initial_translations", "rotation_scale"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_ot_prefers_a_same_hand_pair_over_an_equally_near_mirror_image():
    # Start 1 (hand A) and start 2 (hand B) at ±5 x; final 1 (hand B) and final 2 (hand A) at ±5 y: both
    # assignments cost the same in centroids, only the pairing 1 -> 2, 2 -> 1 keeps the hands (molecule 0, hand A,
    # far from the others in both).
    mirror = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([-1.0, 1.0, 1.0])
    rot = random_rotations(6, dtype=F64, generator=torch.Generator().manual_seed(0))
    hands_start, hands_final = (0, 0, 1), (0, 1, 0)
    c_start = torch.tensor([[0.0, 0, 20], [5, 0, 0], [-5, 0, 0]], dtype=F64)
    c_final = torch.tensor([[0.0, 0, 20], [0, 5, 0], [0, -5, 0]], dtype=F64)
    start = torch.stack([BODY * mirror[h] @ rot[i].T + c_start[i] for i, h in enumerate(hands_start)])
    final = torch.stack([BODY * mirror[h] @ rot[3 + i].T + c_final[i] for i, h in enumerate(hands_final)])
    item = {"atomic_numbers": torch.tensor([6, 7, 8, 1]).repeat(3),
            "molecule_index": torch.arange(3).repeat_interleave(P), "initial_positions": start.reshape(-1, 3),
            "final_positions": final.reshape(-1, 3), "name": "tie"}
    batch = collate_clusters([item], dtype=F64, coupling="ot", free_pairs=True)
    assert torch.allclose(batch.final_translations[0], c_final[[0, 2, 1]], atol=1e-9)
    assert rigid_residuals(batch.body[0], final[[0, 2, 1]]).max() < 1e-6  # every pair now the same hand


def test_sampling_accepts_starts_whose_copies_mirror_the_final_ones(one_thread):
    from kflow.molecular.model.config import build_assembly_model
    from kflow.molecular.model.sampling import predict_assembly

    model, rigid = build_assembly_model(AssemblyModelConfig(num_bands=1, condition_on_start=False, central=True,
                                                            **TINY))
    clusters = [set_start_hands(_racemic_cluster(s), "half").to_data() for s in (6, 7)]
    preds = predict_assembly(model, rigid, clusters, steps=1, batch_size=2)
    assert [p.shape for p in preds] == [(1, M * P, 3)] * 2 and all(torch.isfinite(p).all() for p in preds)


# ---------------------------------------------------------------------------------------- recipe, study, models
def test_config_records_start_mirror_only_when_set():
    from kflow.molecular.model.config import RECIPE_FIELDS

    assert "start_mirror" in RECIPE_FIELDS and AssemblyModelConfig().start_mirror == "crystal"
    assert "start_mirror" not in AssemblyModelConfig().run_record()
    half = AssemblyModelConfig(start_mirror="half")
    assert half.run_record()["start_mirror"] == "half"
    assert AssemblyModelConfig.from_dict(half.to_dict()) == half == AssemblyModelConfig.from_dict(half.run_record())
    assert AssemblyModelConfig.from_dict(AssemblyModelConfig().run_record()).start_mirror == "crystal"
    with pytest.raises(ValueError, match="start_mirror"):
        AssemblyModelConfig(start_mirror="racemic")


def test_train_flag_sets_start_mirror():
    from kflow.molecular.commands import model_config_from_args, train_parser

    parse = train_parser().parse_args
    assert model_config_from_args(parse(["--start-mirror", "half"])).start_mirror == "half"
    assert model_config_from_args(parse(["--generative"])).start_mirror == "crystal"


@pytest.mark.parametrize("redraw", [True, False])
def test_training_sees_starts_with_the_configured_hands(tmp_path, monkeypatch, redraw, one_thread):
    import kflow.molecular.workflow as workflow
    from kflow.molecular.data.store import ClusterStore, write_cluster_store

    clusters = [_racemic_cluster(s, f"X{s % 5}") for s in range(10)]
    store = ClusterStore(write_cluster_store(clusters, tmp_path / "s.lmdb"))
    seen = []

    def spy(items, **kwargs):
        seen.append(kwargs.get("free_pairs"))
        for item in items:
            start = item.initial_positions.double().reshape(M, P, 3)
            odd = torch.arange(M) % 2 == 1
            assert _residuals(start[0], start)[~odd].max() < 1e-4
            assert _residuals(-start[0], start)[odd].max() < 1e-4
        return collate_clusters(items, **kwargs)

    monkeypatch.setattr(workflow, "collate_clusters", spy)
    config = AssemblyModelConfig(num_bands=1, coupling="eot", condition_on_start=False, central=True,
                                 redraw_starts=redraw, start_mirror="half", **TINY)
    model, _, summary = workflow.train_assembly(store, tmp_path / "run", config, steps=2, batch_size=2,
                                                progress=False)
    assert seen and all(seen) and summary["steps_run"] == 2


def _assert_half_hands(dataset):
    """Every start of ``dataset``: even copies rigid copies of molecule 0, odd ones of its mirror image."""
    assert len(dataset) > 0
    odd = torch.arange(M) % 2 == 1
    for i in range(len(dataset)):
        start = _molecules(dataset.cluster(i).initial_positions)
        assert _residuals(start[0], start)[~odd].max() < 1e-4 and _residuals(-start[0], start)[odd].max() < 1e-4


def test_comparison_and_kflow_sample_draw_from_the_models_start_hands(tmp_path, monkeypatch, one_thread):
    """A model trained on "half" starts is sampled from "half" starts by compare_assembly_models and by
    `kflow sample` (not from the crystal-hand starts as stored), and scored against the same crystals."""
    import kflow.molecular.workflow as workflow
    from kflow.cli import main
    from kflow.molecular.data.store import ClusterStore, write_cluster_store

    store_path = write_cluster_store([_racemic_cluster(s, f"X{s % 10}") for s in range(20)], tmp_path / "s.lmdb")
    store = ClusterStore(store_path)
    real_predict, sampled = workflow.predict_assembly, []

    def spy(model, rigid, dataset, *args, **kwargs):
        _assert_half_hands(dataset)
        sampled.append(len(dataset))
        return real_predict(model, rigid, dataset, *args, **kwargs)

    monkeypatch.setattr(workflow, "predict_assembly", spy)
    config = AssemblyModelConfig(num_bands=1, coupling="eot", condition_on_start=False, central=True,
                                 start_mirror="half", **TINY)
    results, _ = workflow.compare_assembly_models(store, tmp_path / "cmp", {"half": config}, steps=1, batch_size=2,
                                                  sample_steps=2, log=lambda *_: None)
    assert sampled and set(results) == {"identity (initial cluster)", "half"}
    checkpoint = tmp_path / "cmp" / "half" / "checkpoints" / "last.pt"
    assert main(["sample", "--checkpoint", str(checkpoint), "--dataset", str(store_path), "--split", "test",
                 "--steps", "2", "--out", str(tmp_path / "pred.npz"), "--no-progress"]) in (0, None)
    assert len(sampled) == 2 and (tmp_path / "pred.npz").is_file()


def test_study_lists_the_two_mirror_rows_for_three_seeds():
    from pathlib import Path

    from benchmarks.assembly_study import ABLATION_ROWS, MIRROR_ROWS, SEEDS, TABLES, _cells, _row_seeds
    from kflow.molecular.data.datasets import with_start_hands
    from kflow.molecular.model.config import GENERATIVE
    from kflow.molecular.study import generative_models

    rows = generative_models()
    k1 = rows["rigid FM (K=1), generative"]
    assert "start_mirror" not in GENERATIVE and k1.start_mirror == "crystal"
    for mirror in ("none", "half"):
        row = f"rigid FM (K=1), generative, mirror {mirror}"
        assert row in MIRROR_ROWS and row not in ABLATION_ROWS and _row_seeds(row, SEEDS) == SEEDS
        assert rows[row] == AssemblyModelConfig(**{**k1.to_dict(), "start_mirror": mirror})
    hard = next(t for t in TABLES if t[:2] == ("csd500", "hard"))
    assert set(MIRROR_ROWS) <= set(hard[2])
    cells = [c for c in _cells(Path("out"), Path("work"), SEEDS, [hard]) if "mirror" in c.row]  # --only mirror
    tested = "rigid FM (K=1), generative, tested on mirror none starts"  # the crystal-hand model, derived row
    assert sorted((c.row, c.seed) for c in cells) == sorted((r, s) for r in (*MIRROR_ROWS, tested) for s in SEEDS)
    data = [_racemic_cluster(0)]
    assert with_start_hands(data, k1.start_mirror) is data
    assert with_start_hands(data, rows[MIRROR_ROWS[1]].start_mirror).mirror == "half"


def test_a_pretrained_model_records_its_start_hands_and_refuses_others(tmp_path, one_thread):
    from kflow.molecular.data.datasets import ClusterDataset
    from kflow.molecular.assemble.pretrained import load_pretrained
    from kflow.molecular.pretraining import train_pretrained
    from kflow.molecular.data.store import ClusterStore, write_cluster_store
    from kflow.molecular.workflow import evaluate_assembly

    main = write_cluster_store([_racemic_cluster(s, f"AAAAA{s}") for s in range(10)], tmp_path / "a.lmdb")
    extra = write_cluster_store([_racemic_cluster(s, f"BBBBB{s}") for s in range(10, 12)], tmp_path / "b.lmdb")
    config = AssemblyModelConfig(num_bands=1, coupling="eot", condition_on_start=False, central=True,
                                 start_mirror="half", **TINY)
    run = dict(preset="mild", datasets=[str(main), str(extra)], root=tmp_path, steps=2, evals=1, val_clusters=1,
               sample_steps=2, progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="mirror 'none' contradicts the training starts' start_mirror 'half'"):
        train_pretrained(tmp_path / "x.pt", config, mirror="none", work=tmp_path / "x", **run)
    meta = train_pretrained(tmp_path / "m.pt", config, work=tmp_path / "m", **run)
    assert meta["mirror"] == "half" and load_pretrained(tmp_path / "m.pt")[2]["mirror"] == "half"
    test = ClusterDataset(ClusterStore(main), split="test")  # scored on starts with the model's hands
    identity = meta["test_metrics"]["identity"]["rmsd15_forced"]["mean"]
    assert identity == pytest.approx(evaluate_assembly(StartHands(test, "half"))["rmsd15_forced"]["mean"], abs=1e-6)
    assert identity != pytest.approx(evaluate_assembly(test)["rmsd15_forced"]["mean"], abs=1e-3)
    crystal = AssemblyModelConfig(**{**config.to_dict(), "start_mirror": "crystal"})
    assert train_pretrained(tmp_path / "c.pt", crystal, work=tmp_path / "c", **run)["mirror"] == "none"
