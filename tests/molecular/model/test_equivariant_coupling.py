"""Equivariant OT coupling: alternating Hungarian assignment and Kabsch rotation about the central molecule."""
import torch

from kflow.molecular.model.flow import collate_clusters, equivariant_coupling
from kflow.molecular.so3 import random_rotations

F64 = torch.float64


def _clusters(b=3, m=17, p=5, seed=0):
    """Start and final clusters [B, M, P, 3] of one rigid molecule (proper copies only), mask [B, M, P]."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randn(p, 3, generator=g, dtype=F64)
    body = body - body.mean(0)

    def cluster(spread):
        rot = random_rotations(b * m, dtype=F64, generator=g).reshape(b, m, 3, 3)
        centres = torch.randn(b, m, 3, generator=g, dtype=F64) * spread
        return torch.einsum("bmij,pj->bmpi", rot, body) + centres[:, :, None]

    return cluster(6.0), cluster(5.0), torch.ones(b, m, p, dtype=torch.bool)


def _coupled(initial, final, mask):
    perm, rot, (p0, p1), cost, history = equivariant_coupling(initial, final, mask)
    x1 = torch.gather(final, 1, perm[:, :, None, None].expand_as(final))
    return torch.einsum("bij,bmpj->bmpi", rot, x1 - p1[:, None, None]) + p0[:, None, None], perm, cost, history


def test_cost_never_increases_and_beats_the_unrotated_assignment():
    initial, final, mask = _clusters()
    _, perm, cost, history = _coupled(initial, final, mask)
    for h in history:
        assert all(b <= a + 1e-9 for a, b in zip(h, h[1:])), h
    assert (perm[:, 0] == 0).all()  # the central molecule keeps its role
    # Against the start as it is (identity rotation, best assignment): the rotation can only help.
    t0, t1 = initial.mean(2), final.mean(2)
    a, c = t0 - t0[:, :1], t1 - t1[:, :1]
    from scipy.optimize import linear_sum_assignment
    for i in range(a.shape[0]):
        d = torch.cdist(a[i], c[i]).square()
        d[0, 1:], d[1:, 0] = float("inf"), float("inf")
        r, col = linear_sum_assignment(d.numpy())
        assert cost[i] <= d[r, col].sum() + 1e-9


def test_coupled_pair_is_invariant_to_a_global_rotation_of_the_target():
    initial, final, mask = _clusters(seed=1)
    q = random_rotations(1, dtype=F64, generator=torch.Generator().manual_seed(5))[0]
    rotated = torch.einsum("ij,bmpj->bmpi", q, final) + torch.tensor([3.0, -2.0, 7.0], dtype=F64)
    a, _, cost_a, _ = _coupled(initial, final, mask)
    b, _, cost_b, _ = _coupled(initial, rotated, mask)
    assert torch.allclose(cost_a, cost_b, atol=1e-8)
    assert torch.allclose(a, b, atol=1e-8)


def test_relabelling_molecules_changes_nothing():
    initial, final, mask = _clusters(seed=2)
    shuffle = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(16, generator=torch.Generator().manual_seed(0)) + 1])
    a, _, cost_a, _ = _coupled(initial, final, mask)
    b, _, cost_b, _ = _coupled(initial, final[:, shuffle], mask)
    assert torch.allclose(cost_a, cost_b, atol=1e-8) and torch.allclose(a, b, atol=1e-8)
    # Relabelling the start relabels the coupled target with it.
    c, _, cost_c, _ = _coupled(initial[:, shuffle], final, mask)
    assert torch.allclose(cost_a, cost_c, atol=1e-8) and torch.allclose(c, a[:, shuffle], atol=1e-8)


def test_collate_with_eot_keeps_rigid_pairs_and_shortens_paths():
    initial, final, mask = _clusters(b=2, seed=3)
    m, p = initial.shape[1:3]
    items = [{"atomic_numbers": torch.full((m * p,), 6), "molecule_index": torch.arange(m).repeat_interleave(p),
              "initial_positions": initial[i].reshape(-1, 3), "final_positions": final[i].reshape(-1, 3),
              "name": f"c{i}"} for i in range(2)]
    ot, eot = collate_clusters(items, coupling="ot"), collate_clusters(items, coupling="eot")
    shift = lambda batch: (batch.final_translations - batch.initial_translations).square().sum(-1).mean()  # noqa: E731
    assert shift(eot) < shift(ot)
    # The coupled final cluster is the crystal moved rigidly: its distance matrix is unchanged.
    d_true = torch.cdist(final[0].reshape(-1, 3), final[0].reshape(-1, 3))
    d_eot = torch.cdist(eot.final_positions()[0].double().reshape(-1, 3), eot.final_positions()[0].double().reshape(-1, 3))
    assert torch.allclose(torch.sort(d_true.flatten()).values, torch.sort(d_eot.flatten()).values, atol=1e-3)
