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

    Convention (every rule uses only atom order and rotation-covariant quantities, so the frame moves with the
    molecule under any rigid motion that keeps the atom order):
    - axes sorted by ascending second moment;
    - (near-)degenerate moments (relative gap < ``degenerate_tol``): axes inside the degenerate subspace are
      fixed by atoms: the first atom with a component in the degenerate plane (two equal moments), or the first
      off-centre atom and then the first atom off that line (three equal moments, e.g. CH4);
    - sign of an axis: the third moment Σ_a (b_a·e)³ positive, or where it vanishes (centrosymmetric
      molecules) the projection of the first atom with a non-zero projection positive;
    - right-handedness: two axes get their sign this way and the third is their cross product (an axis on
      which every atom projects to zero, e.g. the normal of a planar molecule, is the one taken as the cross
      product).
    """
    m = centred.shape[0]
    w = mask.to(centred.dtype)
    cov = torch.einsum("mp,mpi,mpj->mij", w, centred, centred)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    scale = evals[:, -1:].clamp_min(1e-12)  # [M, 1]
    atom_tol = 1e-3 * scale.sqrt()  # [M, 1] Å: below this a projection counts as zero
    rows = torch.arange(m, device=centred.device)

    def unit(v):
        return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def first_atom_off(normal):
        """Unit in-plane direction of the first atom with a component perpendicular to ``normal`` [M, 3]."""
        proj = centred - (centred @ normal[:, :, None]) * normal[:, None, :]  # [M, P, 3]
        idx = (proj.norm(dim=-1) * w > atom_tol).to(torch.int8).argmax(-1)
        return unit(proj[rows, idx])

    e1, e2, e3 = evecs[..., 0], evecs[..., 1], evecs[..., 2]
    deg01 = (evals[:, 1] - evals[:, 0]) < degenerate_tol * scale[:, 0]
    deg12 = (evals[:, 2] - evals[:, 1]) < degenerate_tol * scale[:, 0]
    all3, only01, only12 = deg01 & deg12, deg01 & ~deg12, deg12 & ~deg01
    # Three equal moments: first off-centre atom, then the first atom off that line.
    first = unit(centred[rows, (centred.norm(dim=-1) * w > atom_tol).to(torch.int8).argmax(-1)])
    a1 = torch.where(all3[:, None], first, e1)
    a2 = torch.where(all3[:, None], first_atom_off(first), e2)
    a1 = torch.where(only01[:, None], first_atom_off(e3), a1)  # e3 unique; e1, e2 span the plane
    a2 = torch.where(only01[:, None], torch.linalg.cross(e3, a1), a2)
    a2 = torch.where(only12[:, None], first_atom_off(e1), a2)  # e1 unique; e2, e3 span the plane
    axes = torch.stack([a1, a2, torch.linalg.cross(a1, a2)], 1)  # [M, 3 axes, 3]

    proj = torch.einsum("mpi,mki->mkp", centred, axes) * w[:, None]  # [M, 3, P]
    third = proj.pow(3).sum(-1)  # [M, 3]
    nonzero = proj.abs() > atom_tol[..., None]
    first_proj = torch.gather(proj, 2, nonzero.to(torch.int8).argmax(-1, keepdim=True))[..., 0]
    use_third = third.abs() > 1e-6 * scale ** 1.5
    sign = torch.where(use_third, torch.sign(third), torch.sign(first_proj))
    determined = use_third | nonzero.any(-1)  # [M, 3]
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    f1, f2, f3 = (axes * sign[..., None]).unbind(1)
    # Two determined axes keep their signs; the third follows from right-handedness.
    use12 = (determined[:, 0] & determined[:, 1])[:, None]
    use23 = (~use12[:, 0] & determined[:, 1] & determined[:, 2])[:, None]
    x1 = torch.where(use12, f1, torch.where(use23, torch.linalg.cross(f2, f3), f1))
    x2 = torch.where(use12 | use23, f2, torch.linalg.cross(f3, f1))
    x3 = torch.where(use12, torch.linalg.cross(f1, f2), f3)
    return torch.stack([x1, x2, x3], -1)


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
