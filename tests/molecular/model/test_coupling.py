"""Permutation-aware (OT) coupling of start and final molecules in training batches (issue 10, item 3)."""
import functools
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from kflow.molecular import Cluster, ClusterStore, write_cluster_store
from kflow.molecular.model.config import AssemblyModelConfig
from kflow.molecular.model.flow import RigidKFlow, collate_clusters, optimal_coupling
from kflow.molecular.geometry import masked_centroids, rigid_residuals
from kflow.molecular.so3 import exp_map, random_rotations

F64 = torch.float64


def _body(atoms, generator):
    """A random non-planar molecule centred at its centroid: its mirror image is no rotation of it (atom order
    kept)."""
    body = torch.randn(atoms, 3, dtype=F64, generator=generator) * 1.2
    return body - body.mean(0)


def _item(initial, final, name="c"):
    m, p, _ = initial.shape
    return {"atomic_numbers": torch.tensor([6, 1, 8, 7, 1, 6, 1, 8][:p]).repeat(m),
            "molecule_index": torch.arange(m).repeat_interleave(p),
            "initial_positions": initial.reshape(-1, 3), "final_positions": final.reshape(-1, 3), "name": name}


def _near_start_cluster(seed, molecules=17, atoms=6, spacing=5.0, jitter=0.4, angle=0.3):
    """Final molecules on a lattice with random orientations; each start molecule a small rigid motion away from
    its own final pose, so the index pairing is the optimal one."""
    g = torch.Generator().manual_seed(seed)
    body = _body(atoms, g)
    grid = torch.stack(torch.meshgrid(*[torch.arange(-1, 2, dtype=F64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sites = grid[torch.argsort(grid.norm(dim=-1), stable=True)][:molecules] * spacing
    r1 = random_rotations(molecules, dtype=F64, generator=g)
    final = sites[:, None] + torch.einsum("mij,pj->mpi", r1, body)
    r0 = exp_map(torch.randn(molecules, 3, dtype=F64, generator=g) * angle) @ r1
    start_sites = sites + jitter * torch.randn(molecules, 3, dtype=F64, generator=g)
    initial = start_sites[:, None] + torch.einsum("mij,pj->mpi", r0, body)
    return initial, final


def _random_cluster(seed, molecules=5, atoms=5):
    """Identical molecules, start and final poses drawn independently (no index correspondence)."""
    g = torch.Generator().manual_seed(seed)
    body = _body(atoms, g)
    pose = lambda: (torch.randn(molecules, 3, dtype=F64, generator=g) * 4)[:, None] + torch.einsum(  # noqa: E731
        "mij,pj->mpi", random_rotations(molecules, dtype=F64, generator=g), body)
    return pose(), pose()


def _brute_force_cost(initial, final, weight):
    """Cost matrix from scipy's rotation fit (independent of kflow's Kabsch) and the scale ℓ (radius of gyration)."""
    m = initial.shape[0]
    c0 = (initial - initial.mean(1, keepdim=True)).numpy()
    c1 = (final - final.mean(1, keepdim=True)).numpy()
    t0, t1 = initial.mean(1).numpy(), final.mean(1).numpy()
    scale = np.sqrt((c0[0] ** 2).sum(-1).mean())
    cost = np.empty((m, m))
    for i in range(m):
        for j in range(m):
            rot, _ = Rotation.align_vectors(c1[j], c0[i])
            cost[i, j] = ((t0[i] - t1[j]) ** 2).sum() + weight * (scale * rot.magnitude()) ** 2
    return cost


@pytest.mark.parametrize("weight", [0.0, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assignment_minimises_the_cost_over_all_permutations(seed, weight):
    initial, final = _random_cluster(seed)
    batch = collate_clusters([_item(initial, final)], dtype=F64)
    mask = batch.mask
    perm = optimal_coupling(batch.initial_positions(), batch.final_positions(), mask, batch.rotation_scale,
                            orientation_weight=weight)[0].tolist()
    cost = _brute_force_cost(initial, final, weight)
    totals = {p: sum(cost[i, j] for i, j in enumerate(p)) for p in itertools.permutations(range(5))}
    best = min(totals.values())
    assert totals[tuple(perm)] <= best + 1e-9
    assert sorted(perm) == list(range(5))


def test_orientation_weight_changes_the_assignment_when_orientations_disagree():
    """Two start molecules almost equally far from two final slots: orientations decide once weighted."""
    g = torch.Generator().manual_seed(3)
    body = _body(6, g)
    sites = torch.tensor([[0.0, 0, 0], [6.0, 0, 0]], dtype=F64)
    r0 = random_rotations(1, dtype=F64, generator=g)[0]
    rots = torch.stack([r0, exp_map(torch.tensor([0.0, 0.0, 2.0], dtype=F64)) @ r0])  # 2 rad apart
    final = sites[:, None] + torch.einsum("mij,pj->mpi", rots, body)
    # Start i is slightly nearer to final i (|Δ cost| = 2.4 Å²) but has the orientation of final 1 − i.
    start_sites = torch.tensor([[2.9, 3.0, 0], [3.1, 3.0, 0]], dtype=F64)
    initial = start_sites[:, None] + torch.einsum("mij,pj->mpi", rots.flip(0), body)
    batch = collate_clusters([_item(initial, final)], dtype=F64)
    args = batch.initial_positions(), batch.final_positions(), batch.mask, batch.rotation_scale
    assert optimal_coupling(*args).tolist() == [[0, 1]]
    assert optimal_coupling(*args, orientation_weight=1.0).tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="orientation_weight"):
        optimal_coupling(*args, orientation_weight=-1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_ot_recovers_the_unshuffled_pairing(seed):
    initial, final = _near_start_cluster(seed)
    shuffle = torch.randperm(17, generator=torch.Generator().manual_seed(100 + seed))
    reference = collate_clusters([_item(initial, final)], dtype=F64)
    shuffled = collate_clusters([_item(initial, final[shuffle])], dtype=F64, coupling="ot")
    assert (shuffled.final_translations - reference.final_translations).abs().max() < 1e-10
    assert (shuffled.final_rotations - reference.final_rotations).abs().max() < 1e-10
    assert (shuffled.final_positions() - reference.final_positions()).abs().max() < 1e-10
    # The index pairing of the shuffled data would send molecules across the cluster.
    index = collate_clusters([_item(initial, final[shuffle])], dtype=F64)
    assert (index.final_chart()[..., :3].norm(dim=-1).mean() > 2 * reference.final_chart()[..., :3].norm(dim=-1)
            .mean())


def test_index_coupling_leaves_the_batch_unchanged():
    items = [_item(*_random_cluster(s, molecules=17, atoms=4), name=f"c{s}") for s in range(3)]
    default, index = collate_clusters(items), collate_clusters(items, coupling="index")
    for key, value in vars(default).items():
        other = getattr(index, key)
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    with pytest.raises(ValueError, match="coupling"):
        collate_clusters(items, coupling="hungarian")


@pytest.mark.parametrize("num_bands", [1, 2])
def test_coupled_batch_is_rigid_and_its_chart_ends_at_the_permuted_final_atoms(num_bands):
    items = [_item(*_random_cluster(s, molecules=17, atoms=5 + s % 2), name=f"c{s}") for s in range(3)]
    index = collate_clusters(items, dtype=F64)
    perm = optimal_coupling(index.initial_positions(), index.final_positions(), index.mask,
                            index.rotation_scale, orientation_weight=0.5)
    assert (perm != torch.arange(17)).any(), "the test needs a coupling that moves molecules"
    batch = collate_clusters(items, dtype=F64, coupling="ot", orientation_weight=0.5)
    m = batch.mask
    assert rigid_residuals(batch.initial_positions(), batch.final_positions(), m).max() < 1e-6
    expected = torch.gather(index.final_positions(), 1, perm[:, :, None, None].expand(-1, -1, *m.shape[2:], 3))
    flow = RigidKFlow(num_bands).for_batch(batch)
    z0, z1 = batch.initial_chart(), batch.final_chart()
    at_end = batch.positions_from_chart(flow.interpolate(z0, z1, 1.0))
    at_start = batch.positions_from_chart(flow.interpolate(z0, z1, 0.0))
    assert (at_end[m] - expected[m]).abs().max() < 1e-8
    assert (at_start[m] - index.initial_positions()[m]).abs().max() < 1e-8
    # The coupling only relabels the final cluster: the same final molecules in another order.
    assert torch.allclose(masked_centroids(at_end, m).sum(1), masked_centroids(index.final_positions(), m).sum(1))


def test_translation_only_coupling_shortens_centroid_paths():
    items = [_item(*_random_cluster(s, molecules=17, atoms=4), name=f"c{s}") for s in range(4)]
    index, ot = collate_clusters(items, dtype=F64), collate_clusters(items, dtype=F64, coupling="ot")
    travel = lambda b: (b.final_translations - b.initial_translations).square().sum((1, 2))  # noqa: E731
    assert (travel(ot) <= travel(index) + 1e-9).all() and (travel(ot) < travel(index)).any()


def test_mirror_image_copies_are_never_paired():
    """In a centrosymmetric crystal half the copies are mirror images (same atom order): a start molecule may only
    flow to a final slot it can reach by a proper rigid motion."""
    g = torch.Generator().manual_seed(5)
    body = _body(6, g)
    mirror = body * torch.tensor([-1.0, 1, 1], dtype=F64)
    shapes = [body if k % 2 == 0 else mirror for k in range(8)]
    sites = torch.randn(8, 3, dtype=F64, generator=g) * 5
    final = torch.stack([sites[k] + shapes[k] @ random_rotations(1, dtype=F64, generator=g)[0].T for k in range(8)])
    # Start molecule k has shape k but sits on the site of the molecule of opposite handedness next to it.
    swap = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    initial = torch.stack([sites[swap[k]] + shapes[k] @ random_rotations(1, dtype=F64, generator=g)[0].T
                           for k in range(8)])
    batch = collate_clusters([_item(initial, final)], dtype=F64)
    args = batch.initial_positions(), batch.final_positions(), batch.mask
    assert optimal_coupling(*args, rigidity_tolerance=float("inf")).tolist() == [swap.tolist()]  # unconstrained
    perm = optimal_coupling(*args)[0]
    assert ((perm % 2) == (torch.arange(8) % 2)).all()  # handedness kept
    coupled = collate_clusters([_item(initial, final)], dtype=F64, coupling="ot")
    assert rigid_residuals(coupled.initial_positions(), coupled.final_positions(), coupled.mask).max() < 1e-6


def test_ot_refuses_molecules_with_different_elements():
    initial, final = _random_cluster(0, molecules=4, atoms=4)
    item = _item(initial, final)
    item["atomic_numbers"] = item["atomic_numbers"].clone()
    item["atomic_numbers"][5] = 16
    collate_clusters([item])  # the index pairing does not need identical molecules
    with pytest.raises(ValueError, match="identical"):
        collate_clusters([item], coupling="ot")


# ------------------------------------------------------------------------------- config, training, script
def test_config_coupling_field_defaults_and_validation():
    assert AssemblyModelConfig().coupling == "index"
    old = AssemblyModelConfig(num_bands=3).to_dict()
    del old["coupling"]
    assert AssemblyModelConfig.from_dict(old).coupling == "index"
    assert AssemblyModelConfig.from_dict(AssemblyModelConfig(coupling="ot").to_dict()).coupling == "ot"
    with pytest.raises(ValueError, match="coupling"):
        AssemblyModelConfig(coupling="sinkhorn")


def test_train_assembly_builds_batches_with_the_configured_coupling(tmp_path, monkeypatch):
    import kflow.molecular.workflow as workflow

    clusters = []
    for s in range(10):
        initial, final = _near_start_cluster(s, atoms=4)
        shuffle = torch.randperm(17, generator=torch.Generator().manual_seed(s))
        clusters.append(Cluster(torch.tensor([6, 6, 8, 1]).repeat(17), torch.arange(17).repeat_interleave(4),
                                initial.reshape(-1, 3).float(), final[shuffle].reshape(-1, 3).float(), f"X{s}",
                                f"X{s}"))
    store = ClusterStore(write_cluster_store(clusters, tmp_path / "toy.lmdb"))
    captured = {}

    class Recorder:
        def __init__(self, model, loss_fn, dataset, *, collate_fn=None, **kwargs):
            captured.update(collate=collate_fn, dataset=dataset)
            self.model = model

        def fit(self, resume=False):
            return {}

        def ema_model(self):
            return self.model

    monkeypatch.setattr(workflow, "Trainer", Recorder)
    config = AssemblyModelConfig(hidden_irreps="8x0e + 4x1o + 4x1e", num_molecule_layers=1, coupling="ot")
    workflow.train_assembly(store, tmp_path / "run", config, steps=1, progress=False)
    collate = captured["collate"]
    assert isinstance(collate, functools.partial) and collate.keywords == {"coupling": "ot", "central": False}
    train = captured["dataset"]
    items = [train[i] for i in range(len(train))]
    batch, index = collate(items), collate_clusters(items)
    travel = lambda b: (b.final_translations - b.initial_translations).norm(dim=-1).mean()  # noqa: E731
    assert travel(batch) < 0.5 * travel(index)


def test_train_script_has_a_coupling_flag():
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
    import train_assembly

    from kflow.molecular.commands import model_config_from_args

    assert train_assembly.parse_args(["--coupling", "ot"]).coupling == "ot"
    # the default is resolved with the recipe: index, or eot with --generative unless --coupling is given
    assert model_config_from_args(train_assembly.parse_args([])).coupling == "index"
    assert model_config_from_args(train_assembly.parse_args(["--generative"])).coupling == "eot"
    assert model_config_from_args(train_assembly.parse_args(["--generative", "--coupling", "ot"])).coupling == "ot"
    generative = model_config_from_args(train_assembly.parse_args(["--generative", "--no-redraw-starts"]))
    assert generative.central and not generative.condition_on_start and not generative.redraw_starts
    with pytest.raises(SystemExit):
        train_assembly.parse_args(["--coupling", "greedy"])
