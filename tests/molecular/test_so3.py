"""SO(3) maps: inverse pairs near 0, generic and near π; quaternions; geodesics; gradients."""
import math

import torch

from kflow.molecular.so3 import (exp_map, geodesic_interpolation, log_map, matrix_to_quaternion,
                                 quaternion_to_matrix, random_rotations, rotation_angle)

F64 = torch.float64


def _vectors_with_angles(angles):
    axes = torch.nn.functional.normalize(torch.randn(len(angles), 3, dtype=F64), dim=-1)
    return axes * torch.tensor(angles, dtype=F64)[:, None]


def test_exp_is_a_rotation_and_log_inverts_it():
    angles = [0.0, 1e-12, 1e-7, 1e-4, 0.3, 1.0, 2.5, math.pi - 1e-2, math.pi - 1e-4, math.pi - 1e-7]
    omega = _vectors_with_angles(angles)
    rot = exp_map(omega)
    eye = torch.eye(3, dtype=F64)
    assert torch.allclose(rot @ rot.transpose(-1, -2), eye.expand_as(rot), atol=1e-12)
    assert torch.allclose(torch.det(rot), torch.ones(len(angles), dtype=F64), atol=1e-12)
    back = log_map(rot)
    assert (back - omega).abs().max() < 1e-6  # near π the angle itself is only determined to ~1e-8·(π-θ)⁻¹
    assert (exp_map(back) - rot).abs().max() < 1e-12


def test_log_at_exactly_pi_and_random_rotations():
    for axis in torch.eye(3, dtype=F64):
        rot = exp_map(axis * math.pi)
        omega = log_map(rot)
        assert abs(omega.norm() - math.pi) < 1e-9
        assert torch.allclose(exp_map(omega), rot, atol=1e-9)
    rot = random_rotations(1000, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(exp_map(log_map(rot)), rot, atol=1e-9)
    # Haar measure: the angle density is (1 − cos θ)/π, whose mean is π/2 + 2/π.
    assert abs(rotation_angle(rot).mean() - (math.pi / 2 + 2 / math.pi)) < 0.06


def test_quaternion_round_trip_and_canonical_sign():
    rot = random_rotations(200, dtype=F64, generator=torch.Generator().manual_seed(1))
    q = matrix_to_quaternion(rot)
    assert (q[:, 0] >= 0).all()
    assert torch.allclose(quaternion_to_matrix(q), rot, atol=1e-12)
    assert torch.allclose(matrix_to_quaternion(quaternion_to_matrix(-q)), q, atol=1e-12)


def test_geodesic_endpoints_and_constant_speed():
    r0, r1 = random_rotations(5, dtype=F64), random_rotations(5, dtype=F64)
    assert torch.allclose(geodesic_interpolation(r0, r1, torch.zeros(5, dtype=F64)), r0, atol=1e-12)
    assert torch.allclose(geodesic_interpolation(r0, r1, torch.ones(5, dtype=F64)), r1, atol=1e-9)
    mid = geodesic_interpolation(r0, r1, torch.full((5,), 0.5, dtype=F64))
    d0 = rotation_angle(mid @ r0.transpose(-1, -2))
    d1 = rotation_angle(r1 @ mid.transpose(-1, -2))
    assert torch.allclose(d0, d1, atol=1e-9)


def test_gradients_are_finite_near_identity():
    omega = torch.tensor([[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0], [1e-5, 2e-5, 0.0]], dtype=F64, requires_grad=True)
    exp_map(omega).sum().backward()
    assert torch.isfinite(omega.grad).all()
    torch.autograd.gradcheck(exp_map, (torch.randn(4, 3, dtype=F64, requires_grad=True),))
