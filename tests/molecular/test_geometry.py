"""Rigid frames: a deterministic, right-handed convention that moves with the molecule, including symmetric
molecules whose inertia moments are degenerate; the fast residual used in preprocessing agrees with the frames."""
import math

import numpy as np
import pytest
import torch

from kflow.molecular import rigid_frames
from kflow.molecular.geometry import fit_rigid_motion, rigid_residuals
from kflow.molecular.so3 import random_rotations

F64 = torch.float64
_ANG = torch.arange(6, dtype=F64) * math.pi / 3
_RING = torch.stack([torch.cos(_ANG), torch.sin(_ANG), 0 * _ANG], -1)
MOLECULES = {
    "asymmetric": torch.randn(9, 3, generator=torch.Generator().manual_seed(1), dtype=F64),
    "methane (3 equal moments)": torch.tensor([[0, 0, 0], [1, 1, 1], [-1, -1, 1], [-1, 1, -1], [1, -1, -1]],
                                              dtype=F64) * 0.63,
    "SF6 (3 equal, centrosymmetric)": torch.cat([torch.zeros(1, 3, dtype=F64), 1.56 * torch.eye(3, dtype=F64),
                                                 -1.56 * torch.eye(3, dtype=F64)]),
    "benzene (planar, 2 equal)": torch.cat([1.39 * _RING, 2.47 * _RING]),
    "ammonia (2 equal)": torch.tensor([[0, 0, 0.38], [0.94, 0, 0], [-0.47, 0.81, 0], [-0.47, -0.81, 0]], dtype=F64),
}


@pytest.mark.parametrize("name", list(MOLECULES))
def test_frame_convention_follows_rigid_motions(name):
    """Copies of one molecule under random rigid motions (atom order kept), frames of all copies in one call:
    identical body coordinates, rotations R_k = Q_k R_0, det +1, atoms reproduced."""
    mol = MOLECULES[name]
    copies = 32
    q = random_rotations(copies, F64, generator=torch.Generator().manual_seed(0))
    q[0] = torch.eye(3, dtype=F64)
    shift = torch.randn(copies, 3, generator=torch.Generator().manual_seed(1), dtype=F64) * 5
    positions = (torch.einsum("kij,pj->kpi", q, mol) + shift[:, None]).reshape(-1, 3)  # [copies * P, 3]
    index = torch.arange(copies).repeat_interleave(len(mol))
    rot, trans, body = rigid_frames(positions, index)
    assert torch.allclose(torch.det(rot), torch.ones(copies, dtype=F64), atol=1e-10)
    assert torch.allclose(rot.transpose(1, 2) @ rot, torch.eye(3, dtype=F64).expand(copies, 3, 3), atol=1e-10)
    body = body.reshape(copies, len(mol), 3)
    assert (body - body[0]).abs().max() < 1e-8
    assert torch.allclose(rot, q @ rot[0], atol=1e-8)
    rebuilt = trans[index] + torch.einsum("nij,nj->ni", rot[index], body.reshape(-1, 3))
    assert (rebuilt - positions).abs().max() < 1e-10


def test_frames_depend_on_atom_order_only_through_the_convention():
    """Frames are a function of the atoms in order: recomputing gives bit-identical results (no randomness)."""
    pos = torch.randn(40, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    idx = torch.arange(4).repeat_interleave(10)
    a, b = rigid_frames(pos, idx), rigid_frames(pos.clone(), idx.clone())
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_fast_residual_matches_frames_and_detects_non_rigid_motion():
    g = torch.Generator().manual_seed(4)
    body = torch.randn(17, 6, 3, generator=g, dtype=F64)
    q = random_rotations(17, F64, generator=g)
    final = torch.einsum("mij,mpj->mpi", q, body) + torch.randn(17, 1, 3, generator=g, dtype=F64)
    final[5, 2] += 0.3  # bend molecule 5
    index = torch.arange(17).repeat_interleave(6)
    _, _, body_frames = rigid_frames(body.reshape(-1, 3), index)
    slow = fit_rigid_motion(body_frames, final.reshape(-1, 3), index)[2].numpy()
    fast = rigid_residuals(body, final).numpy()
    # the closed form sqrt(msd) has a cancellation floor of ~1e-7 Å, far below the 1e-3 Å tolerance
    assert np.allclose(slow, fast, atol=1e-6)
    assert fast[5] > 0.05 and np.delete(fast, 5).max() < 1e-6
    # padding (mask) does not change the residual of a smaller molecule
    padded = np.concatenate([final.numpy(), np.full((17, 2, 3), 7.0)], 1)
    mask = np.concatenate([np.ones((17, 6), bool), np.zeros((17, 2), bool)], 1)
    assert np.allclose(rigid_residuals(torch.cat([body, torch.zeros(17, 2, 3, dtype=F64)], 1),
                                       torch.from_numpy(padded), torch.from_numpy(mask)).numpy(), fast, atol=1e-6)
    _, _, res = fit_rigid_motion(body.reshape(-1, 3), final.reshape(-1, 3), index)
    assert np.allclose(res.numpy(), fast, atol=1e-6)


def test_rigid_frames_rejects_bad_shapes():
    with pytest.raises(ValueError, match="positions \\[N, 3\\]"):
        rigid_frames(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long))
