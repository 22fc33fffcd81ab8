"""SO(3) utilities, batched and numerically safe near the identity and near rotations by π.

Rotation vectors ω ∈ R³ (axis · angle, angle ∈ [0, π]) are the chart used for molecular orientations:
``exp_map(ω)`` gives R, ``log_map(R)`` returns ω. Conventions: matrices act on column vectors, x' = R x; for row
vectors in a tensor [..., N, 3] use ``x @ R.transpose(-1, -2)``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["skew", "unskew", "exp_map", "log_map", "matrix_to_quaternion", "quaternion_to_matrix",
           "geodesic_interpolation", "random_rotations", "rotation_angle"]

_SMALL = 1e-4  # below this angle Taylor expansions are exact to float64 rounding


def skew(v: torch.Tensor) -> torch.Tensor:
    """[..., 3] -> [..., 3, 3] with skew(v) @ x = v × x."""
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v.unbind(-1)
    return torch.stack([torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1),
                        torch.stack([-y, x, zero], -1)], -2)


def unskew(m: torch.Tensor) -> torch.Tensor:
    """Vector of the antisymmetric part: [..., 3, 3] -> [..., 3]."""
    return 0.5 * torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)


def exp_map(omega: torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotation vector [..., 3] -> rotation matrix [..., 3, 3]. Smooth (and differentiable) at 0."""
    theta2 = (omega * omega).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    theta = theta2.clamp_min(1e-30).sqrt()
    small = theta < _SMALL
    safe = torch.where(small, torch.ones_like(theta), theta)
    a = torch.where(small, 1 - theta2 / 6 + theta2 ** 2 / 120, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - theta2 / 24 + theta2 ** 2 / 720, (1 - torch.cos(safe)) / (safe * safe))
    k = skew(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def rotation_angle(rot: torch.Tensor) -> torch.Tensor:
    """Angle in [0, π] of rotation matrices [..., 3, 3] -> [...]."""
    cos = ((rot[..., 0, 0] + rot[..., 1, 1] + rot[..., 2, 2] - 1) / 2).clamp(-1, 1)
    sin = unskew(rot).norm(dim=-1)
    return torch.atan2(sin, cos)  # atan2 is accurate at both ends, unlike acos


def log_map(rot: torch.Tensor) -> torch.Tensor:
    """Rotation matrix [..., 3, 3] -> rotation vector [..., 3] with angle in [0, π].

    Near 0 uses ω ≈ vee(R − Rᵀ)/2 · θ/sin θ; near π (where sin θ → 0 and the antisymmetric part vanishes) the axis
    comes from the symmetric part (R + I)/2 = a aᵀ, with its sign fixed by the antisymmetric part when available.
    """
    theta = rotation_angle(rot)[..., None]  # [..., 1]
    vee = unskew(rot)  # sin θ · axis
    sin = torch.sin(theta)
    near_pi = theta > math.pi - 1e-3
    small = theta < _SMALL
    factor = torch.where(small, 1 + theta ** 2 / 6, theta / torch.where(small | near_pi, torch.ones_like(sin), sin))
    omega = vee * factor
    if near_pi.any():
        sym = 0.5 * (rot + rot.transpose(-1, -2))
        # (R + Rᵀ)/2 = cos θ I + (1 − cos θ) a aᵀ  ->  a aᵀ = ((R + Rᵀ)/2 − cos θ I) / (1 − cos θ)
        cos = torch.cos(theta)[..., None]
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        outer = (sym - cos * eye) / (1 - cos).clamp_min(1e-12)
        col = outer.diagonal(dim1=-2, dim2=-1).argmax(-1)  # largest diagonal -> best-conditioned column
        axis = torch.gather(outer, -1, col[..., None, None].expand(*outer.shape[:-1], 1)).squeeze(-1)
        axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        # Fix the sign with the (small but informative) antisymmetric part; at exactly π either sign is valid.
        sign = torch.sign((axis * vee).sum(-1, keepdim=True))
        axis = axis * torch.where(sign == 0, torch.ones_like(sign), sign)
        omega = torch.where(near_pi, axis * theta, omega)
    return omega


def matrix_to_quaternion(rot: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] -> unit quaternions [..., 4] (w, x, y, z) with the canonical sign w >= 0."""
    m = rot
    trace = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    # Four candidate formulas; pick per element the one with the largest (best-conditioned) denominator.
    cands = torch.stack([
        torch.stack([1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                     m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0],
                     1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                     1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
    ], -2)  # [..., 4, 4]
    diag = torch.stack([1 + trace, 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                        1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1)
    best = diag.argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return q * torch.where(q[..., :1] < 0, -torch.ones_like(q[..., :1]), torch.ones_like(q[..., :1]))


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Quaternions [..., 4] (w, x, y, z; normalised here) -> rotation matrices [..., 3, 3]."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def geodesic_interpolation(r0: torch.Tensor, r1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """R(t) = exp(t · log(R1 R0ᵀ)) R0 for t [...] broadcast against the rotations [..., 3, 3]."""
    omega = log_map(r1 @ r0.transpose(-1, -2))
    return exp_map(omega * torch.as_tensor(t, dtype=omega.dtype, device=omega.device)[..., None]) @ r0


def random_rotations(n: int, dtype=torch.float32, device=None, generator: torch.Generator | None = None):
    """n Haar-uniform rotations [n, 3, 3] (uniform unit quaternions)."""
    q = torch.randn(n, 4, dtype=torch.float64, generator=generator)
    return quaternion_to_matrix(q).to(dtype=dtype, device=device)
