"""Assembly metrics against straightforward reference implementations and their invariances."""
import numpy as np
import pytest
import torch

from kflow.molecular.geometry import kabsch
from kflow.molecular.metrics import (aggregate_min_over_repeats, collision_rate, compute_packing_matching,
                                     rmsd15, separation_rate)

F64 = torch.float64


def _rotation(seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=F64, generator=g))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _lattice_cluster(atoms_per_molecule=6, num_molecules=17, spacing=6.0, seed=0):
    """17 copies of one rigid random molecule on well-separated lattice sites, molecule 0 at the centre."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randn(atoms_per_molecule, 3, dtype=F64, generator=g) * 0.8
    grid = torch.stack(torch.meshgrid(*[torch.arange(-1, 2, dtype=F64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[torch.argsort(grid.norm(dim=-1), stable=True)][:num_molecules] * spacing
    pos = torch.cat([body @ _rotation(seed * 100 + i).T + grid[i] for i in range(num_molecules)])
    mol = torch.arange(num_molecules).repeat_interleave(atoms_per_molecule)
    z = torch.tensor([6, 1, 8, 6, 1, 7] * 10)[:atoms_per_molecule].repeat(num_molecules)
    return pos, mol, z


def _reference_pm(true, pred, mol):
    """Plain numpy loops, as a reader would write the definition."""
    true, pred, mol = true.numpy(), pred.numpy(), mol.numpy()
    n = len(true)
    acc = 0.0
    for i in range(n):
        for j in range(n):
            acc += (np.linalg.norm(true[i] - true[j]) - np.linalg.norm(pred[i] - pred[j])) ** 2
    pm_atom = np.sqrt(acc / n ** 2)
    m = mol.max() + 1
    ct = np.stack([true[mol == k].mean(0) for k in range(m)])
    cp = np.stack([pred[mol == k].mean(0) for k in range(m)])
    acc = sum((np.linalg.norm(ct[i] - ct[j]) - np.linalg.norm(cp[i] - cp[j])) ** 2 for i in range(m) for j in range(m))
    return pm_atom, np.sqrt(acc / m ** 2)


def test_packing_matching_equals_loop_reference_on_batches_of_different_sizes():
    trues, preds, mols, batch = [], [], [], []
    for b, apm in enumerate([3, 5, 4]):
        true, mol, _ = _lattice_cluster(apm, seed=b)
        trues.append(true)
        preds.append(true + torch.randn_like(true) * (0.5 + b))
        mols.append(mol)
        batch.append(torch.full((len(true),), b))
    pm = compute_packing_matching(torch.cat(trues), torch.cat(preds), torch.cat(mols), torch.cat(batch))
    for b in range(3):
        ref_atom, ref_center = _reference_pm(trues[b], preds[b], mols[b])
        assert abs(pm.pm_atom[b].item() - ref_atom) < 1e-9
        assert abs(pm.pm_center[b].item() - ref_center) < 1e-9
        single = compute_packing_matching(trues[b], preds[b], mols[b])
        assert torch.allclose(single.pm_atom, pm.pm_atom[b:b + 1])


def test_packing_matching_across_chunk_boundaries():
    """Large and small clusters mixed, so the cache-sized chunks (padded per chunk) split the batch."""
    from kflow.molecular.metrics import _cluster_chunks

    trues, preds, mols, batch = [], [], [], []
    for b, apm in enumerate([40, 3, 40, 3, 41]):
        true, mol, _ = _lattice_cluster(apm, seed=b)
        trues.append(true)
        preds.append(true + torch.randn_like(true))
        mols.append(mol)
        batch.append(torch.full((len(true),), b))
    batch_all = torch.cat(batch)
    chunks = list(_cluster_chunks(torch.bincount(batch_all).tolist(), budget=1_000_000))
    assert len(chunks) > 1
    assert [i for s, e, *_ in chunks for i in range(s, e)] == list(range(5))  # every cluster exactly once
    pm = compute_packing_matching(torch.cat(trues), torch.cat(preds), torch.cat(mols), batch_all)
    for b in range(5):
        t, p = trues[b].numpy(), preds[b].numpy()
        dt = np.linalg.norm(t[:, None] - t[None], axis=-1)
        dp = np.linalg.norm(p[:, None] - p[None], axis=-1)
        assert abs(pm.pm_atom[b].item() - np.sqrt(((dt - dp) ** 2).mean())) < 1e-9


def test_packing_matching_zero_and_invariances():
    true, mol, _ = _lattice_cluster()
    pm = compute_packing_matching(true, true.clone(), mol)
    assert pm.pm_atom.item() == 0 and pm.pm_center.item() == 0
    moved = true @ _rotation(7).T + torch.tensor([3.0, -2.0, 10.0], dtype=F64)
    pm = compute_packing_matching(true, moved, mol)
    assert pm.pm_atom.item() < 1e-10 and pm.pm_center.item() < 1e-10
    # Rotating each molecule about its own centroid changes PM-atom but not PM-center.
    spun = true.clone()
    for k in range(17):
        sel = mol == k
        c = true[sel].mean(0)
        spun[sel] = (true[sel] - c) @ _rotation(50 + k).T + c
    pm = compute_packing_matching(true, spun, mol)
    assert pm.pm_center.item() < 1e-10 and pm.pm_atom.item() > 0.1


def test_packing_matching_errors():
    true, mol, _ = _lattice_cluster()
    with pytest.raises(ValueError, match="pred_positions"):
        compute_packing_matching(true, true[:-1], mol)
    with pytest.raises(ValueError, match="molecule_index"):
        compute_packing_matching(true, true, mol[:-1])
    bad = true.clone()
    bad[5, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compute_packing_matching(true, bad, mol)
    with pytest.raises(ValueError, match="molecule 3"):
        compute_packing_matching(true, true, torch.where(mol == 3, torch.full_like(mol, 4), mol))
    with pytest.raises(ValueError, match="empty"):
        compute_packing_matching(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_rmsd15_zero_for_rigid_copy_and_relabelled_molecules():
    true, mol, z = _lattice_cluster(6)
    moved = true @ _rotation(3).T + 5.0
    assert rmsd15(true, moved, mol, z).item() < 1e-8
    # Swap the places of molecules: molecule labels 1..16 permuted (central molecule stays 0).
    perm = torch.cat([torch.tensor([0]), torch.randperm(16) + 1])
    relabelled = torch.cat([true[mol == perm[k]] for k in range(17)])
    assert rmsd15(true, relabelled @ _rotation(4).T, mol, z).item() < 1e-8
    noisy = moved + torch.randn_like(moved) * 0.3
    assert rmsd15(true, noisy, mol, z).item() > 0.1


def test_kabsch_recovers_motion_and_ignores_zero_weights():
    x = torch.randn(4, 10, 3, dtype=F64)
    rot = torch.stack([_rotation(i) for i in range(4)])
    y = torch.einsum("bij,bpj->bpi", rot, x) + torch.randn(4, 1, 3, dtype=F64)
    w = torch.ones(4, 10, dtype=F64)
    y_bad = y.clone()
    y_bad[:, -1] += 100.0
    w[:, -1] = 0
    r, t = kabsch(x, y_bad, w)
    assert torch.allclose(r, rot, atol=1e-10)
    assert torch.allclose(torch.einsum("bij,bpj->bpi", r, x) + t[:, None], y, atol=1e-9)


def test_collision_and_separation_rates():
    true, mol, z = _lattice_cluster(6, spacing=6.0)
    assert collision_rate(true, mol, z).item() == 0
    squeezed = true.clone()
    squeezed[mol == 1] = true[mol == 0] + 0.1  # molecule 1 sits on top of molecule 0
    assert collision_rate(squeezed, mol, z).item() > 0
    # Spread far apart: every molecule is separated; packed tight: none.
    far = true.clone()
    for k in range(17):
        far[mol == k] += true[mol == k].mean(0) * 4.0
    assert separation_rate(far, mol, z).item() == 100.0
    tight, mol_t, z_t = _lattice_cluster(6, spacing=3.0)
    assert separation_rate(tight, mol_t, z_t).item() == 0.0


def test_aggregate_min_over_repeats():
    values = torch.tensor([[3.0, 1.0, 5.0], [2.0, 4.0, 6.0]])
    mean, std, best = aggregate_min_over_repeats(values)
    assert best.tolist() == [2.0, 1.0, 5.0]
    assert abs(mean - 8 / 3) < 1e-12 and abs(std - np.std([2.0, 1.0, 5.0])) < 1e-12


def test_metrics_take_numpy_arrays_and_lists_and_name_bad_indices():
    """Chemistry pipelines hold numpy arrays: same numbers back, as numpy; float indices and gaps in the cluster
    ids are refused with the real reason."""
    true, mol, z = _lattice_cluster(3, seed=1)
    pred = true + 0.1 * torch.randn_like(true)
    ref = compute_packing_matching(true, pred, mol)
    out = compute_packing_matching(true.numpy(), pred.numpy(), mol.numpy())
    assert isinstance(out.pm_atom, np.ndarray) and np.allclose(out.pm_atom, ref.pm_atom.numpy())
    listed = compute_packing_matching(true.tolist(), pred.tolist(), mol.tolist())
    assert np.allclose(listed.pm_center, ref.pm_center.numpy())
    assert isinstance(collision_rate(pred.numpy(), mol.numpy(), z.numpy()), np.ndarray)
    assert isinstance(rmsd15(true.numpy(), pred.numpy(), mol.numpy(), z.numpy()), np.ndarray)
    with pytest.raises(ValueError, match="molecule_index must hold integers"):
        compute_packing_matching(true.numpy(), pred.numpy(), mol.numpy().astype(float))
    with pytest.raises(ValueError, match="molecule_index must hold integers"):
        compute_packing_matching(true, pred, mol.double())
    both_t, both_p = torch.cat([true, true]), torch.cat([pred, pred])
    gap = torch.cat([torch.zeros(len(true), dtype=torch.long), torch.full((len(true),), 2)])
    with pytest.raises(ValueError, match=r"without gaps.*cluster\(s\) \[1\]"):
        compute_packing_matching(both_t, both_p, torch.cat([mol, mol]), gap)
