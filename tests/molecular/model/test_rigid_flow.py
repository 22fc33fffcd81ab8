"""Rigid-body K-Flow: chart endpoints, velocity, SE(3) equivariance of the path, the network and the sampler."""
import pytest
import torch

from kflow.core import BandSchedule
from kflow.molecular.model.flow import RigidityError, RigidKFlow, collate_clusters
from kflow.molecular.geometry import masked_centroids
from kflow.molecular.model.network import AssemblyFlowModel, AssemblyNetwork
from kflow.molecular.so3 import random_rotations

F64 = torch.float64


def synthetic_cluster(seed, atoms=5, molecules=17, name="c"):
    """Rigid copies of one random molecule: random initial poses, final poses a rigid motion away."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randn(atoms, 3, dtype=F64, generator=g) * 1.2
    sites = torch.randn(molecules, 3, dtype=F64, generator=g) * 5
    r0 = random_rotations(molecules, dtype=F64, generator=g)
    r1 = random_rotations(molecules, dtype=F64, generator=g)
    x0 = sites[:, None] + torch.einsum("mij,pj->mpi", r0, body)
    x1 = 0.7 * sites[:, None] + torch.einsum("mij,pj->mpi", r1, body) + 0.3 * torch.randn(molecules, 1, 3, dtype=F64,
                                                                                          generator=g)
    return {"atomic_numbers": torch.tensor([6, 1, 8, 7, 1, 6, 1][:atoms]).repeat(molecules),
            "molecule_index": torch.arange(molecules).repeat_interleave(atoms),
            "initial_positions": x0.reshape(-1, 3), "final_positions": x1.reshape(-1, 3), "name": name}


def _move(item, rot, shift):
    out = dict(item)
    out["initial_positions"] = item["initial_positions"] @ rot.T + shift
    out["final_positions"] = item["final_positions"] @ rot.T + shift
    return out


def _proper_rotation(seed):
    return random_rotations(1, dtype=F64, generator=torch.Generator().manual_seed(seed))[0]


@pytest.mark.parametrize("num_bands", [1, 2, 3])
def test_chart_endpoints_reproduce_initial_and_final_atoms(num_bands):
    items = [synthetic_cluster(0), synthetic_cluster(1, atoms=4)]
    batch = collate_clusters(items, dtype=F64)
    flow = RigidKFlow(num_bands).for_batch(batch)
    z0, z1 = batch.initial_chart(), batch.final_chart()
    m = batch.mask
    for t, key in [(0.0, "initial_positions"), (1.0, "final_positions")]:
        pos = batch.positions_from_chart(flow.interpolate(z0, z1, t))
        expected = torch.cat([it[key] for it in items])
        assert (pos[m] - expected).abs().max() < 1e-5


def test_chart_velocity_is_time_derivative_and_one_band_is_linear():
    batch = collate_clusters([synthetic_cluster(2)], dtype=F64)
    z0, z1 = batch.initial_chart(), batch.final_chart()
    for k in [1, 2, 3]:
        flow = RigidKFlow(k, ramp="smooth").for_batch(batch)
        t = torch.tensor([0.37], dtype=F64)
        fd = (flow.interpolate(z0, z1, t + 1e-6) - flow.interpolate(z0, z1, t - 1e-6)) / 2e-6
        assert (fd - flow.target_velocity(z0, z1, t)).abs().max() < 1e-5
    flow = RigidKFlow(1).for_batch(batch)
    assert torch.allclose(flow.interpolate(z0, z1, 0.25), 0.25 * z1, atol=1e-12)


def test_path_is_se3_equivariant():
    item = synthetic_cluster(3)
    rot, shift = _proper_rotation(5), torch.tensor([1.0, -4.0, 2.5], dtype=F64)
    a = collate_clusters([item], dtype=F64)
    b = collate_clusters([_move(item, rot, shift)], dtype=F64)
    t = torch.tensor([0.6], dtype=F64)
    za = RigidKFlow(3).for_batch(a).interpolate(a.initial_chart(), a.final_chart(), t)
    zb = RigidKFlow(3).for_batch(b).interpolate(b.initial_chart(), b.final_chart(), t)
    xa, xb = a.positions_from_chart(za), b.positions_from_chart(zb)
    assert (xa[a.mask] @ rot.T + shift - xb[b.mask]).abs().max() < 1e-9


def test_non_rigid_cluster_is_rejected_with_location():
    item = synthetic_cluster(4)
    item["final_positions"] = item["final_positions"].clone()
    item["final_positions"][7] += 0.5  # atom 7 belongs to molecule 1
    with pytest.raises(RigidityError, match="molecule 1"):
        collate_clusters([item])


def _small_model(num_bands=2, **network_kwargs):
    torch.manual_seed(0)
    net = AssemblyNetwork("8x0e + 4x1o + 4x1e", num_molecule_layers=1, schedule=BandSchedule(num_bands),
                          **{"num_atom_layers": 1, **network_kwargs}).double()
    for p in net.head.parameters():  # the head is small at init; make outputs O(1) so the test is sensitive
        torch.nn.init.normal_(p)
    return AssemblyFlowModel(net)


NETWORK_VARIANTS = [dict(conv="uvu"), dict(conv="fctp"), dict(conv="uvu", heavy_atoms_only=True, num_atom_layers=2),
                    dict(conv="fctp", num_atom_layers=2)]


@pytest.mark.parametrize("variant", NETWORK_VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_network_is_se3_equivariant_and_parity_correct(variant):
    model = _small_model(**variant)
    items = [synthetic_cluster(5), synthetic_cluster(6, atoms=3)]
    t = torch.tensor([0.2, 0.7], dtype=F64)
    a = collate_clusters(items, dtype=F64)
    za = RigidKFlow(2).for_batch(a).interpolate(a.initial_chart(), a.final_chart(), t)
    out_a = model(za, t, batch=a)
    for rot in [_proper_rotation(9), -_proper_rotation(10)]:  # proper rotation, then rotoinversion
        b = collate_clusters([_move(it, rot, torch.tensor([3.0, 0.5, -1.0], dtype=F64)) for it in items], dtype=F64)
        zb = RigidKFlow(2).for_batch(b).interpolate(b.initial_chart(), b.final_chart(), t)
        out_b = model(zb, t, batch=b)
        det = torch.det(rot)
        # translations rotate as vectors (1o); rotation vectors as pseudovectors (1e): det(Q)·Q ω
        assert (out_b[..., :3] - out_a[..., :3] @ rot.T).abs().max() < 1e-4
        assert (out_b[..., 3:] - det * out_a[..., 3:] @ rot.T).abs().max() < 1e-4
    assert out_a.abs().max() > 0.1  # not trivially zero


def test_fixed_graph_is_the_rebuilt_graph():
    """The intra-molecular edges built once from body coordinates are the ones a rebuild at any pose finds, so a
    sampler that reuses them integrates exactly the same flow."""
    model = _small_model(num_atom_layers=2)
    batch = collate_clusters([synthetic_cluster(3), synthetic_cluster(4, atoms=4)], dtype=F64)
    flow = RigidKFlow(2).for_batch(batch)
    graph = model.preprocess(batch)
    z = flow.interpolate(batch.initial_chart(), batch.final_chart(), torch.tensor([0.4, 0.9], dtype=F64))
    assert torch.equal(model(z, torch.tensor([0.4, 0.9], dtype=F64), batch=batch, graph=graph),
                       model(z, torch.tensor([0.4, 0.9], dtype=F64), batch=batch))
    kwargs = [{"batch": batch, "graph": graph}, {"batch": batch}]
    z1 = [flow.sample(model, batch.initial_chart(), steps=4, method="band", model_kwargs=kw) for kw in kwargs]
    assert torch.equal(z1[0], z1[1])
    assert graph.intra_src.numel() > 0 and (z1[0] - batch.initial_chart()).abs().max() > 1e-3


def _atom_edges(model, batch):
    graph = model.preprocess(batch)
    positions = batch.initial_positions()
    src, dst, _, _ = model.network._atom_edges(positions, masked_centroids(positions, batch.mask), graph)
    return graph, src, dst


@pytest.mark.parametrize("heavy", [False, True])
def test_pruned_edge_search_finds_exactly_the_pairs_within_the_cutoffs(heavy):
    """Intra edges from the body geometry + inter edges searched only between nearby molecules == a brute-force
    search over all atom pairs of each cluster."""
    model = _small_model(heavy_atoms_only=heavy)
    net = model.network
    batch = collate_clusters([synthetic_cluster(3, atoms=7), synthetic_cluster(8, atoms=4)], dtype=F64)
    graph, src, dst = _atom_edges(model, batch)
    pos = batch.initial_positions()
    b, m, p, _ = pos.shape
    flat, atom = pos.reshape(-1, 3), batch.atomic_numbers.reshape(-1)
    cluster = torch.arange(b).repeat_interleave(m * p)
    molecule = torch.arange(b * m).repeat_interleave(p)
    real = batch.mask.reshape(-1) & ((atom > 1) if heavy else True)
    d = torch.cdist(flat, flat)
    same = molecule[:, None] == molecule[None]
    brute = (real[:, None] & real[None] & (cluster[:, None] == cluster[None]) & ~torch.eye(len(flat), dtype=torch.bool)
             & torch.where(same, d < net.intra_cutoff, d < net.inter_cutoff))
    found = torch.zeros_like(brute)
    found[dst, src] = True
    assert torch.equal(found, brute) and len(src) == int(brute.sum())  # each pair once
    assert (~same[dst, src]).any()  # the clusters are dense enough to have inter edges
    if heavy:
        hydrogen = atom == 1
        assert hydrogen[batch.mask.reshape(-1)].any() and not (hydrogen[src] | hydrogen[dst]).any()


def test_configs_saved_before_conv_existed_load_the_fctp_network():
    from kflow.molecular.model.config import AssemblyModelConfig

    old = AssemblyModelConfig().to_dict()
    del old["conv"], old["heavy_atoms_only"]
    legacy = AssemblyModelConfig.from_dict(old)
    assert legacy.conv == "fctp" and legacy.heavy_atoms_only is False
    assert AssemblyModelConfig().conv == "uvu" and AssemblyModelConfig().heavy_atoms_only is True
    with pytest.raises(ValueError, match="conv must be one of"):
        AssemblyNetwork(conv="dense")


def test_sampler_is_se3_equivariant():
    model = _small_model()
    item = synthetic_cluster(7)
    rot, shift = _proper_rotation(11), torch.tensor([-2.0, 1.0, 0.0], dtype=F64)
    finals = []
    for it in [item, _move(item, rot, shift)]:
        batch = collate_clusters([it], dtype=F64)
        flow = RigidKFlow(2).for_batch(batch)
        z = flow.sample(model, batch.initial_chart(), steps=6, method="band", model_kwargs={"batch": batch})
        finals.append(batch.positions_from_chart(z)[batch.mask])
    assert (finals[0] @ rot.T + shift - finals[1]).abs().max() < 1e-4


@pytest.mark.parametrize("condition_on_start", [False, True])
def test_a_true_noise_source_network_predicts_from_the_current_poses_only(condition_on_start):
    # Two batches at the same current atoms x_t but different starts: without start conditioning the predicted
    # final atoms are the same; with it (the refinement model) they are not, so the test can tell the two apart.
    model = _small_model()
    model.condition_on_start = condition_on_start
    items = [synthetic_cluster(5), synthetic_cluster(6, atoms=3)]
    t = torch.tensor([0.3, 0.6], dtype=F64)
    a = collate_clusters(items, dtype=F64)
    za = RigidKFlow(2).for_batch(a).interpolate(a.initial_chart(), a.final_chart(), t)
    current = a.positions_from_chart(za)  # [B, M, P, 3]
    restarted = [{**it, "initial_positions": current[i][a.mask[i]]} for i, it in enumerate(items)]
    b = collate_clusters(restarted, dtype=F64)
    zb = b.initial_chart()  # the same atoms, now the start itself
    assert (b.positions_from_chart(zb)[b.mask] - current[a.mask]).abs().max() < 1e-9
    final_a = a.positions_from_chart(model(za, t, batch=a))[a.mask]
    final_b = b.positions_from_chart(model(zb, t, batch=b))[b.mask]
    same = (final_a - final_b).abs().max() < 1e-6
    assert bool(same) == (not condition_on_start)


def test_unwrapped_rotation_vector_is_the_same_rotation_nearest_the_reference():
    from kflow.molecular.model.network import unwrap_rotation_vector
    from kflow.molecular.so3 import exp_map

    axis = torch.nn.functional.normalize(torch.tensor([[1.0, 2.0, -0.5]], dtype=F64), dim=-1)
    omega = 3.0 * axis  # just below π
    reference = -3.1 * axis  # the other side of the cut
    out = unwrap_rotation_vector(omega, reference)
    assert torch.allclose(exp_map(out), exp_map(omega), atol=1e-12)
    assert (out - reference).norm() < 0.2 and torch.allclose(unwrap_rotation_vector(omega, omega), omega)
