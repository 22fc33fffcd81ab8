"""Per-molecule rigid frames: centroid, right-handed inertial axes with a deterministic sign convention, body
coordinates. Vectorised over molecules (and clusters, via a flat molecule index)."""
from __future__ import annotations

import torch

from kflow.molecular.metrics import kabsch

__all__ = ["rigid_frames", "fit_rigid_motion", "inertial_axes"]


def _gather_molecules(positions: torch.Tensor, molecule_index: torch.Tensor):
    """[N, 3], [N] -> padded [M, P, 3] with mask [M, P] and the order used (atoms of a molecule keep their order)."""
    m = int(molecule_index.max()) + 1
    counts = torch.bincount(molecule_index, minlength=m)
    order = torch.argsort(molecule_index, stable=True)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(molecule_index.numel(), device=positions.device) - start[molecule_index[order]]
    p = int(counts.max())
    dense = positions.new_zeros(m, p, 3)
    dense[molecule_index[order], slot] = positions[order]
    mask = torch.zeros(m, p, dtype=torch.bool, device=positions.device)
    mask[molecule_index[order], slot] = True
    return dense, mask, order, slot


def inertial_axes(centred: torch.Tensor, mask: torch.Tensor, degenerate_tol: float = 1e-3) -> torch.Tensor:
    """Right-handed principal axes [M, 3, 3] (columns) of centred molecules [M, P, 3] (unit weights).

    Convention: axes sorted by ascending second moment; each axis's sign makes the third moment Σ_a (b_a·e)³
    positive, or, where that vanishes (symmetric molecules), the projection of the first atom with a non-zero
    projection. For (near-)degenerate moments the axes inside the degenerate plane are fixed by the first atom
    with a component in that plane. The third axis is e1 × e2, so det = +1.
    """
    w = mask.to(centred.dtype)
    cov = torch.einsum("mp,mpi,mpj->mij", w, centred, centred)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    scale = evals[:, -1:].clamp_min(1e-12)
    e1, e2 = evecs[..., 0], evecs[..., 1]
    # Degenerate pairs: (0,1) degenerate -> the unique axis is e3; rebuild e1 from atoms in the degenerate plane.
    deg01 = (evals[:, 1] - evals[:, 0]) < degenerate_tol * scale[:, 0]
    deg12 = (evals[:, 2] - evals[:, 1]) < degenerate_tol * scale[:, 0]

    def first_atom_in_plane(normal):
        proj = centred - (centred @ normal[:, :, None]) * normal[:, None, :]  # [M, P, 3]
        norm = proj.norm(dim=-1) * w
        idx = (norm > 1e-3 * scale.sqrt()).to(torch.int8).argmax(-1)  # first atom off the axis
        v = proj[torch.arange(proj.shape[0]), idx]
        return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    e3 = evecs[..., 2]
    e1 = torch.where(deg01[:, None], first_atom_in_plane(e3), e1)
    e2 = torch.where(deg01[:, None], torch.linalg.cross(e3, e1), e2)
    e2 = torch.where(deg12[:, None] & ~deg01[:, None], first_atom_in_plane(e1), e2)

    def fix_sign(axis):
        proj = torch.einsum("mpi,mi->mp", centred, axis) * w
        third = proj.pow(3).sum(-1)
        first = torch.gather(proj, 1, (proj.abs() > 1e-3 * scale.sqrt()).to(torch.int8).argmax(-1, keepdim=True))[:, 0]
        sign = torch.where(third.abs() > 1e-6 * scale[:, 0] ** 1.5, torch.sign(third), torch.sign(first))
        return axis * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]

    e1 = fix_sign(e1)
    e2 = fix_sign(e2 - (e2 * e1).sum(-1, keepdim=True) * e1)
    e2 = e2 / e2.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.stack([e1, e2, torch.linalg.cross(e1, e2)], -1)


def rigid_frames(positions: torch.Tensor, molecule_index: torch.Tensor):
    """Rigid frame of every molecule.

    Args:
        positions: [N, 3] atom positions.
        molecule_index: [N] molecule of each atom (0..M-1; for several clusters use a global molecule id).
    Returns:
        rotations [M, 3, 3] (columns = body axes in the world frame), translations [M, 3] (centroids) and
        body_coordinates [N, 3] with positions = translations[mol] + rotations[mol] @ body.
    """
    if positions.dim() != 2 or positions.shape[1] != 3 or molecule_index.shape != positions.shape[:1]:
        raise ValueError(f"rigid_frames expects positions [N, 3] and molecule_index [N], got "
                         f"{tuple(positions.shape)} and {tuple(molecule_index.shape)}")
    dense, mask, order, slot = _gather_molecules(positions, molecule_index.long())
    w = mask.to(dense.dtype)
    centroid = (dense * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    centred = (dense - centroid[:, None]) * w[..., None]
    axes = inertial_axes(centred, mask)
    body_dense = torch.einsum("mji,mpj->mpi", axes, centred)  # Rᵀ (x − T)
    body = torch.empty_like(positions)
    body[order] = body_dense[molecule_index[order], slot]
    return axes, centroid, body


def fit_rigid_motion(body: torch.Tensor, positions: torch.Tensor, molecule_index: torch.Tensor):
    """Best rigid pose per molecule mapping body coordinates onto positions (Kabsch).

    Returns rotations [M, 3, 3], translations [M, 3] and the RMS residual per molecule [M] (Å).
    """
    b, mask, _, _ = _gather_molecules(body, molecule_index.long())
    x, _, _, _ = _gather_molecules(positions, molecule_index.long())
    w = mask.to(b.dtype)
    rot, trans = kabsch(b, x, w)
    fitted = torch.einsum("mij,mpj->mpi", rot, b) + trans[:, None]
    residual = (((fitted - x).pow(2).sum(-1) * w).sum(-1) / w.sum(-1)).sqrt()
    return rot, trans, residual
