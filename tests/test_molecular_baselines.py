"""The data-free evenly spread shell baseline."""
import torch

from kflow.molecular.baselines import shell_predictions, thomson_points
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
    from kflow.molecular.crystals import NoiseModel

    g = torch.Generator().manual_seed(0)
    final = torch.randn(17, 1, 3, generator=g, dtype=torch.float64) * 5 + torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    centre = final.mean(1).mean(0)
    for central in (True, False):
        start = NoiseModel(placement="random", central=central).apply(final, torch.Generator().manual_seed(1), 200.0)
        c = start.mean(1)
        off = (c[0] - centre).norm()
        assert (off < 1e-9) == central  # without `central` molecule 0 is only the nearest to the centre
        assert (c[1:] - c[0]).norm(dim=-1).min() >= 0.7 * 200.0 ** (1 / 3) - 1e-9 or not central
