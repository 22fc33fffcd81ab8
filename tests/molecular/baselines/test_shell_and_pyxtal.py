"""The data-free evenly spread shell baseline."""
import torch

from kflow.molecular.baselines.shell import shell_predictions
from kflow.molecular.data.starts import thomson_points
from kflow.molecular.geometry import rigid_residuals


def test_thomson_points_are_on_the_sphere_and_spread_evenly():
    x = thomson_points(16)
    assert torch.allclose(x.norm(dim=-1), torch.ones(16, dtype=x.dtype), atol=1e-12)
    nearest = torch.cdist(x, x).fill_diagonal_(9).amin(1)
    # 16 points: the Thomson optimum's nearest-neighbour distance is ~0.9; a random draw is far less even.
    assert nearest.min() > 0.8 and nearest.max() / nearest.min() < 1.15


class _Item:
    def __init__(self, initial, mol):
        self.initial_positions, self.molecule_index = initial, mol


def test_shell_keeps_molecules_rigid_central_at_the_centre_and_the_start_radius():
    g = torch.Generator().manual_seed(0)
    body = torch.randn(6, 3, generator=g, dtype=torch.float64)
    body = body - body.mean(0)
    centres = torch.randn(17, 3, generator=g, dtype=torch.float64) * 5
    start = (body[None] + centres[:, None]).reshape(-1, 3)
    mol = torch.arange(17).repeat_interleave(6)
    pred = shell_predictions([_Item(start, mol)], seed=0)[0][0].reshape(17, 6, 3)
    assert rigid_residuals(start.reshape(17, 6, 3), pred).max() < 1e-6  # every copy moved rigidly (closed form: ~1e-8 rounding)
    centroids, centre = pred.mean(1), centres.mean(0)
    assert torch.allclose(centroids[0], centre, atol=1e-9)
    radius = (centres - centre).norm(dim=-1).sort().values[1:].mean()
    assert torch.allclose((centroids[1:] - centre).norm(dim=-1), radius.expand(16), atol=1e-9)
    again = shell_predictions([_Item(start, mol)], seed=0)[0]
    assert torch.equal(again[0].reshape(17, 6, 3), pred)


def test_central_random_placement_puts_molecule_zero_at_the_centre():
    from kflow.molecular.data.starts import NoiseModel

    g = torch.Generator().manual_seed(0)
    final = torch.randn(17, 1, 3, generator=g, dtype=torch.float64) * 5 + torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    centre = final.mean(1).mean(0)
    for central in (True, False):
        start = NoiseModel(placement="random", central=central).apply(final, torch.Generator().manual_seed(1), 200.0)
        c = start.mean(1)
        off = (c[0] - centre).norm()
        assert (off < 1e-9) == central  # without `central` molecule 0 is only the nearest to the centre
        assert (c[1:] - c[0]).norm(dim=-1).min() >= 0.7 * 200.0 ** (1 / 3) - 1e-9 or not central


# ------------------------------------------------------------------------------------------------ PyXtal baseline
def _chiral_cluster(seed: int = 0):
    """A start of 17 copies of CHFClBr (chiral; every atom a different element, so a wrong atom order shows), each
    randomly rotated, every third one mirrored, spread at random; final_positions random (the baseline must not use
    them)."""
    from torch_geometric.data import Data

    from kflow.molecular.so3 import random_rotations

    g = torch.Generator().manual_seed(seed)
    tetra = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64) / 3 ** 0.5
    body = torch.cat([torch.zeros(1, 3, dtype=torch.float64), tetra * torch.tensor([1.09, 1.35, 1.77, 1.94],
                                                                                     dtype=torch.float64)[:, None]])
    body = body - body.mean(0)
    copies = body.expand(17, -1, -1).clone()
    copies[::3, :, 0] *= -1
    copies = torch.einsum("mij,mpj->mpi", random_rotations(17, dtype=torch.float64, generator=g), copies)
    copies = copies + torch.randn(17, 1, 3, generator=g, dtype=torch.float64) * 6
    z = torch.tensor([6, 1, 9, 17, 35]).repeat(17)
    mol = torch.arange(17).repeat_interleave(5)
    start = copies.reshape(-1, 3).float()
    return Data(initial_positions=start, final_positions=torch.randn(85, 3, generator=g), atomic_numbers=z,
                molecule_index=mol)


def _fits(pred, item):
    """RMS residual [M] of the best proper rigid copy of start molecule 0 (and of its mirror image) on each predicted
    molecule."""
    body = item.initial_positions.double()[item.molecule_index == 0]
    x = pred[0].double().reshape(17, -1, 3)
    mirror = body * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    return rigid_residuals(body.expand(17, -1, -1), x), rigid_residuals(mirror.expand(17, -1, -1), x)


def test_pyxtal_predictions_are_rigid_copies_of_the_start_molecule_in_atom_order():
    import numpy as np

    from kflow.molecular.baselines.pyxtal import pyxtal_predictions

    items = [_chiral_cluster(0), _chiral_cluster(1)]
    state = np.random.get_state()
    info = {}
    preds = pyxtal_predictions(items, seed=0, space_groups=("P21/c", "P212121"), attempts=1, info=info)
    assert np.array_equal(np.random.get_state()[1], state[1])  # numpy's global generator is left as it was
    assert info["fallback"] == 0 and info["candidates"] == 4 and len(info["space_group"]) == 2
    for item, pred in zip(items, preds):
        assert pred.shape == (1, 85, 3) and pred.dtype == item.initial_positions.dtype
        proper, mirrored = _fits(pred, item)
        assert torch.minimum(proper, mirrored).max() < 1e-4  # every molecule rigid (or mirrored), atoms in order
        centroids = pred[0].double().reshape(17, 5, 3).mean(1)
        gaps = torch.cdist(centroids, centroids).fill_diagonal_(99).amin(1)
        assert gaps.min() > 2.0  # a packed cluster, not a pile (CHFClBr neighbours sit ~4-5 Å apart)
    # One hand per group: P2₁2₁2₁ (no improper operations) keeps every copy proper; P2₁/c holds both hands.
    for group in ("P212121", "P21/c"):
        info = {}
        pred = pyxtal_predictions(items[:1], seed=0, space_groups=(group,), attempts=1, info=info)[0]
        proper, mirrored = _fits(pred, items[0])
        is_mirror = mirrored + 1e-3 < proper
        assert int(is_mirror.sum()) == info["mirrored"][0]
        assert (info["mirrored"][0] == 0) == (group == "P212121")


def test_pyxtal_predictions_are_seeded_and_never_read_the_crystal():
    from kflow.molecular.baselines.pyxtal import pyxtal_predictions

    item = _chiral_cluster(2)
    kwargs = dict(space_groups=("P-1", "P21"), attempts=1)
    first = pyxtal_predictions([item], seed=3, **kwargs)[0]
    assert torch.equal(pyxtal_predictions([item], seed=3, **kwargs)[0], first)
    other = item.clone()
    other.final_positions = other.final_positions * 5 + 7  # another "crystal": same start, same prediction
    assert torch.equal(pyxtal_predictions([other], seed=3, **kwargs)[0], first)
    assert not torch.equal(pyxtal_predictions([item], seed=4, **kwargs)[0], first)


def test_pyxtal_predictions_fall_back_to_the_shell_when_every_candidate_fails(monkeypatch, caplog):
    import kflow.molecular.baselines as baselines
    import kflow.molecular.baselines.pyxtal as pyxtal_baseline

    def fail(*args, **kwargs):
        raise RuntimeError("long time to generate structure, check inputs")

    monkeypatch.setattr(pyxtal_baseline, "_random_crystal", fail)
    items = [_chiral_cluster(0), _chiral_cluster(1)]
    info = {}
    with caplog.at_level("WARNING", logger="kflow.molecular.baselines"):
        preds = baselines.pyxtal_predictions(items, seed=5, space_groups=("P21/c",), attempts=2, info=info)
    assert info["fallback"] == 2 and info["fallback_clusters"] == [0, 1] and info["failed_candidates"] == 4
    assert info["space_group"] == [None, None] and "2 of 2 cluster(s) fell back" in caplog.text
    for i, (item, pred) in enumerate(zip(items, preds)):
        assert torch.equal(pred, baselines.shell_predictions([item], seed=5 + i)[0])
    monkeypatch.undo()  # pyxtal itself failing: a group it does not know
    info = {}
    pred = baselines.pyxtal_predictions(items[:1], seed=5, space_groups=("P9/z",), attempts=1, info=info)[0]
    assert info["fallback"] == 1 and info["failed_candidates"] == 1
    assert torch.equal(pred, baselines.shell_predictions(items[:1], seed=5)[0])
