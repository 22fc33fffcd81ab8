"""COMPACK-style packing similarity: the truth scores 15/15, a random start scores low."""
import torch

from kflow.molecular.evaluation.packing_similarity import packing_similarity
from kflow.molecular.so3 import random_rotations

F64 = torch.float64


def _crystal_like_cluster(seed=0):
    g = torch.Generator().manual_seed(seed)
    body = torch.randn(7, 3, generator=g, dtype=F64) * 1.2
    body = body - body.mean(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(-1, 2, dtype=F64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centres = grid[torch.argsort(grid.norm(dim=-1), stable=True)][:17] * 6.0  # central + 16 nearest sites
    rot = random_rotations(2, dtype=F64, generator=g)
    rots = rot[torch.arange(17) % 2]  # two orientations, like a crystal with two molecules per cell
    return torch.einsum("mij,pj->mpi", rots, body) + centres[:, None], g


def test_truth_scores_fifteen_of_fifteen_in_any_frame_and_numbering():
    true, g = _crystal_like_cluster()
    q = random_rotations(1, dtype=F64, generator=g)[0]
    moved = (true @ q.T + torch.tensor([5.0, -3.0, 2.0], dtype=F64))[torch.cat([torch.tensor([0]), torch.randperm(16, generator=g) + 1])]
    for pred in (true, moved):
        score = packing_similarity(true, pred)
        assert score.matched == 15 and score.rmsd < 1e-6


def test_random_start_scores_low_and_small_noise_keeps_matches():
    true, g = _crystal_like_cluster(1)
    rots = random_rotations(17, dtype=F64, generator=g)
    body = true - true.mean(1, keepdim=True)
    random_start = torch.einsum("mij,mpj->mpi", rots, body) + torch.randn(17, 1, 3, generator=g, dtype=F64) * 8
    assert packing_similarity(true, random_start).matched <= 4
    jittered = true + torch.randn(17, 1, 3, generator=g, dtype=F64) * 0.1  # rigid shifts of 0.1 Å
    close = packing_similarity(true, jittered)
    assert close.matched == 15 and 0 < close.rmsd < 0.3


def test_a_mirror_image_neighbour_never_matches():
    true, _ = _crystal_like_cluster(2)
    pred = true.clone()
    c = pred[3].mean(0)
    pred[3] = 2 * c - pred[3]  # neighbour 3 inverted through its centroid: same place, other hand
    assert packing_similarity(true, pred).matched == 14
