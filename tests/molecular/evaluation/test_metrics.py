"""Assembly metrics against straightforward reference implementations and their invariances."""
import numpy as np
import pytest
import torch

from kflow.molecular.geometry import kabsch
from kflow.molecular.evaluation.collisions import collision_rate, separation_rate
from kflow.molecular.evaluation.matching import aggregate_min_over_repeats, compute_packing_matching
from kflow.molecular.evaluation.rmsd import rmsd15

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
    from kflow.molecular.evaluation.dense import cluster_chunks as _cluster_chunks

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


# --------------------------------------------------------------------- permutation-invariant packing matching
from kflow.molecular.evaluation.matching import match_molecules, permute_molecules  # noqa: E402


def _rigid_noise(positions, mol, seed, shift=0.4, angle=0.25):
    """Each molecule moved by a small random rigid motion about its centroid (a prediction with the right labels)."""
    from kflow.molecular.so3 import exp_map

    g = torch.Generator().manual_seed(seed)
    out = positions.clone()
    for k in range(int(mol.max()) + 1):
        sel = mol == k
        c = positions[sel].mean(0)
        rot = exp_map(torch.randn(3, dtype=F64, generator=g) * angle)
        out[sel] = (positions[sel] - c) @ rot.T + c + shift * torch.randn(3, dtype=F64, generator=g)
    return out


def _batch(clusters):
    """Concatenate [(positions, molecule_index), ...] into (positions, molecule_index, batch)."""
    pos = torch.cat([p for p, _ in clusters])
    mol = torch.cat([m for _, m in clusters])
    batch = torch.cat([torch.full((len(p),), i) for i, (p, _) in enumerate(clusters)])
    return pos, mol, batch


def _random_sites_cluster(seed, atoms=5, molecules=17, spread=4.0):
    """Identical molecules at random sites with random orientations (no lattice symmetry)."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randn(atoms, 3, dtype=F64, generator=g)
    sites = torch.randn(molecules, 3, dtype=F64, generator=g) * spread
    pos = torch.cat([body @ _rotation(seed * 100 + k).T + sites[k] for k in range(molecules)])
    return pos, torch.arange(molecules).repeat_interleave(atoms)


def _relabel(pos, mol, batch, seed):
    """Random relabelling of every cluster's molecules, and the permutation used."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(int(mol.max()) + 1, generator=g) for _ in range(int(batch.max()) + 1)])
    return permute_molecules(pos, mol, perm, batch), perm


@pytest.mark.parametrize("seed", [0, 1])
def test_invariant_pm_is_zero_for_the_truth_relabelled_moved_or_mirrored(seed):
    true, mol, _ = _lattice_cluster(6, seed=seed)
    relabelled, perm = _relabel(true, mol, torch.zeros_like(mol), seed + 10)
    paired = compute_packing_matching(true, relabelled, mol)
    assert paired.pm_atom.item() > 0.5 and paired.pm_center.item() > 0.5
    pm = compute_packing_matching(true, relabelled, mol, permutation_invariant=True)
    assert pm.pm_atom.item() == 0 and pm.pm_center.item() == 0  # exactly the paired value of the truth
    for moved in (relabelled @ _rotation(seed + 20).T + torch.tensor([4.0, -1.0, 2.0], dtype=F64), -relabelled):
        pm = compute_packing_matching(true, moved, mol, permutation_invariant=True)
        assert pm.pm_atom.item() < 1e-9 and pm.pm_center.item() < 1e-9
    # The matching undoes the relabelling: molecule i of the relabelled cluster was true molecule perm[i].
    match = match_molecules(true, relabelled, mol, criterion="pm_atom")
    assert torch.equal(match[0], torch.argsort(perm[0]))
    assert torch.equal(permute_molecules(relabelled, mol, match), true)


def test_invariant_pm_does_not_depend_on_how_predicted_molecules_are_labelled():
    clusters = [_random_sites_cluster(s, atoms=4 + s % 3) for s in range(4)] + [_lattice_cluster(5, seed=7)[:2]]
    true, mol, batch = _batch(clusters)
    hard = _batch([_random_sites_cluster(50 + s, atoms=4 + s % 3) for s in range(4)]
                  + [_lattice_cluster(5, seed=8)[:2]])[0]  # independent clusters: no index correspondence
    for pred in (_rigid_noise(true, batch * 17 + mol, 1, shift=0.8, angle=0.6), hard):
        ref = compute_packing_matching(true, pred, mol, batch, permutation_invariant=True)
        for seed in range(3):
            relabelled, _ = _relabel(pred, mol, batch, seed)
            pm = compute_packing_matching(true, relabelled, mol, batch, permutation_invariant=True)
            assert (pm.pm_atom - ref.pm_atom).abs().max() < 1e-9
            assert (pm.pm_center - ref.pm_center).abs().max() < 1e-9
    paired = compute_packing_matching(true, hard, mol, batch)
    assert (ref.pm_center < paired.pm_center).all()  # matching finds far better pairs than arbitrary labels


@pytest.mark.parametrize("shift, angle", [(0.1, 0.05), (0.4, 0.25), (0.8, 0.5)])
def test_invariant_pm_is_never_worse_than_a_correct_index_pairing(shift, angle):
    clusters = [_random_sites_cluster(s, spread=5.0) for s in range(6)] + [_lattice_cluster(6, seed=s)[:2]
                                                                           for s in range(2)]
    true, mol, batch = _batch(clusters)
    pred = _rigid_noise(true, batch * 17 + mol, 3, shift, angle)
    paired = compute_packing_matching(true, pred, mol, batch)
    pm = compute_packing_matching(true, pred, mol, batch, permutation_invariant=True)
    assert (pm.pm_atom <= paired.pm_atom + 1e-9).all() and (pm.pm_center <= paired.pm_center + 1e-9).all()
    if shift <= 0.1:  # close to the truth the index pairing is the optimum and is found
        assert (pm.pm_atom - paired.pm_atom).abs().max() < 1e-12


def test_invariant_pm_is_an_upper_bound_that_finds_the_exact_pm_center_of_small_clusters():
    """M = 5: the exact minimum over all 120 relabellings by brute force (each relabelling a cluster of a batch)."""
    import itertools

    perms = torch.tensor(list(itertools.permutations(range(5))))
    for seed in range(4):
        true, mol = _random_sites_cluster(seed, atoms=4, molecules=5, spread=3.0)
        for pred in (_random_sites_cluster(seed + 100, atoms=4, molecules=5, spread=3.0)[0],
                     _rigid_noise(true, mol, seed, shift=1.0, angle=1.0)):
            n = len(perms)
            batch = torch.arange(n).repeat_interleave(len(true))
            every = compute_packing_matching(true.repeat(n, 1), permute_molecules(pred.repeat(n, 1), mol.repeat(n),
                                                                                  perms, batch), mol.repeat(n), batch)
            pm = compute_packing_matching(true, pred, mol, permutation_invariant=True)
            assert pm.pm_atom.item() >= every.pm_atom.min().item() - 1e-9  # realised by a permutation
            assert abs(pm.pm_center.item() - every.pm_center.min().item()) < 1e-9


def test_match_and_permute_molecules_api_and_errors():
    true, mol, _ = _lattice_cluster(4, seed=3)
    pred = _rigid_noise(true, mol, 0)
    out = match_molecules(true.numpy(), pred.numpy(), mol.numpy())
    assert isinstance(out, np.ndarray) and out.shape == (1, 17) and sorted(out[0].tolist()) == list(range(17))
    assert isinstance(compute_packing_matching(true.numpy(), pred.numpy(), mol.numpy(),
                                               permutation_invariant=True).pm_atom, np.ndarray)
    with pytest.raises(ValueError, match="criterion"):
        match_molecules(true, pred, mol, criterion="rmsd")
    uneven = mol.clone()
    uneven[3] = 1  # molecule 0 loses an atom to molecule 1
    with pytest.raises(ValueError, match="different atom counts"):
        compute_packing_matching(true, pred, uneven, permutation_invariant=True)
    compute_packing_matching(true, pred, uneven)  # the index pairing does not need identical molecules
    with pytest.raises(ValueError, match="exactly once"):
        permute_molecules(true, mol, torch.zeros(17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, M\]"):
        permute_molecules(true, mol, torch.arange(16))
    # One cluster: a [M] permutation is accepted; relabelling twice by inverse permutations is the identity.
    p = torch.randperm(17)
    assert torch.equal(permute_molecules(permute_molecules(true, mol, p), mol, torch.argsort(p)), true)


def test_evaluate_assembly_reports_index_paired_and_matched_packing():
    from kflow.molecular import Cluster
    from kflow.molecular.workflow import METRICS, evaluate_assembly, format_results_table

    items = []
    for s in range(3):
        final, mol, z = _lattice_cluster(4, seed=s)
        items.append(Cluster(z, mol, _rigid_noise(final, mol, s, 1.0, 1.0), final, f"c{s}", f"c{s}").to_data())
    # A prediction that is the truth with its molecules relabelled: perfect, but not by index.
    relabelled = [permute_molecules(it.final_positions, it.molecule_index, torch.randperm(17))[None] for it in items]
    res = evaluate_assembly(items, relabelled)
    assert {"pm_atom_perm", "pm_center_perm"} <= set(METRICS) <= set(res)
    assert res["pm_atom"]["mean"] > 0.5 and res["pm_center"]["mean"] > 0.5
    assert res["pm_atom_perm"]["mean"] < 1e-9 and res["pm_center_perm"]["mean"] < 1e-9
    identity = evaluate_assembly(items)
    assert identity["pm_center_perm"]["mean"] <= identity["pm_center"]["mean"] + 1e-9
    table = format_results_table({"identity": identity, "relabelled truth": res}).splitlines()
    assert "PM-center, matched (Å)" in table[0]
    assert all(line.count("|") == table[0].count("|") for line in table)
