"""Rigid-body geometry of molecules: padding atoms by molecule, centroids, inertial frames, Kabsch fits.

Everything here is batched and has no notion of flows, networks or metrics; the model path (``flow``, ``network``)
and the evaluation path (``metrics``) both import from here. Conventions: rotations act on column vectors, so a
pose (R, T) maps body coordinates b to x = T + R b; for row vectors [..., P, 3] that is ``b @ Rᵀ + T``.
"""
from __future__ import annotations

import torch

__all__ = ["pad_by_index", "masked_centroids", "index_centroids", "kabsch", "rigid_residuals", "inertial_axes",
           "rigid_frames", "fit_rigid_motion", "atoms_from_poses"]

DEGENERATE_MOMENT_TOL = 1e-3  # relative gap below which two second moments of a molecule count as equal


# ------------------------------------------------------------------------------------------------------ padding
def pad_by_index(values: torch.Tensor, index: torch.Tensor, num_groups: int | None = None, fill=0):
    """Scatter rows of ``values`` [N, ...] into dense groups: [G, P, ...] with mask [G, P] and the slot [N].

    Row n goes to ``dense[index[n], slot[n]]``; rows of a group keep their order. P is the largest group.
    """
    index = index.long()
    num_groups = int(index.max()) + 1 if num_groups is None else num_groups
    counts = torch.bincount(index, minlength=num_groups)
    order = torch.argsort(index, stable=True)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(index)
    slot[order] = torch.arange(index.numel(), device=index.device) - start[index[order]]
    width = int(counts.max()) if counts.numel() else 0
    dense = values.new_full((num_groups, width, *values.shape[1:]), fill)
    dense[index, slot] = values
    mask = torch.zeros(num_groups, width, dtype=torch.bool, device=values.device)
    mask[index, slot] = True
    return dense, mask, slot


# ---------------------------------------------------------------------------------------------------- centroids
def masked_centroids(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unweighted centroids of padded point sets: [..., P, 3], [..., P] -> [..., 3] (empty sets give 0)."""
    w = mask.to(positions.dtype)[..., None]
    return (positions * w).sum(-2) / w.sum(-2).clamp_min(1)


def index_centroids(positions: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Unweighted centroids of concatenated point sets: [N, 3] with group ``index`` [N] -> [G, 3]."""
    total = positions.new_zeros(num_groups, 3).index_add_(0, index, positions)
    count = torch.bincount(index, minlength=num_groups).to(positions.dtype)
    return total / count[:, None]


# ------------------------------------------------------------------------------------------------------- Kabsch
def kabsch(mobile: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
           translate: bool = True):
    """Optimal proper rotation and translation mapping ``mobile`` onto ``target`` (batched).

    Args: mobile, target [..., P, 3]; weights [..., P] (0 = ignore a point, e.g. padding or hydrogens);
    ``translate=False``: rotation about the origin only (t = 0), for point sets pinned at a common pivot.
    Returns (R [..., 3, 3], t [..., 3]) with target ≈ mobile @ Rᵀ + t.
    """
    if weights is None:
        weights = torch.ones(mobile.shape[:-1], dtype=mobile.dtype, device=mobile.device)
    w = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    mu_m = (w[..., None] * mobile).sum(-2) * translate
    mu_t = (w[..., None] * target).sum(-2) * translate
    cov = torch.einsum("...p,...pi,...pj->...ij", w, target - mu_t[..., None, :], mobile - mu_m[..., None, :])
    u, _, vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.det(u @ vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    diag = torch.ones(*cov.shape[:-2], 3, dtype=cov.dtype, device=cov.device)
    diag[..., -1] = sign
    rot = u @ torch.diag_embed(diag) @ vh
    return rot, mu_t - torch.einsum("...ij,...j->...i", rot, mu_m)


def rigid_residuals(initial: torch.Tensor, final: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RMS residual [...] (Å) of the best rigid motion taking ``initial`` [..., P, 3] onto ``final`` [..., P, 3].

    Closed form from the singular values of the cross-covariance, no rotation is built:
    msd = (Σ|x̃|² + Σ|ỹ|² − 2 (s1 + s2 ± s3)) / P, the sign of s3 making the rotation proper. The subtraction
    limits precision to ~1e-7 Å in float64, far below rigidity tolerances (1e-3 Å). ``mask`` [..., P] marks real
    atoms of padded molecules.
    """
    if mask is None:
        mask = torch.ones(initial.shape[:-1], dtype=torch.bool, device=initial.device)
    w = mask.to(initial.dtype)[..., None]  # [..., P, 1]
    count = w.sum((-2, -1))
    x = (initial - masked_centroids(initial, mask)[..., None, :]) * w
    y = (final - masked_centroids(final, mask)[..., None, :]) * w
    u, s, vh = torch.linalg.svd(torch.einsum("...pi,...pj->...ij", x, y))
    proper = torch.sign(torch.det(u) * torch.det(vh))  # a reflection would fit better: take the proper rotation
    s = torch.cat([s[..., :2], s[..., 2:] * torch.where(proper == 0, torch.ones_like(proper), proper)[..., None]], -1)
    msd = (x.square().sum((-2, -1)) + y.square().sum((-2, -1)) - 2 * s.sum(-1)) / count.clamp_min(1)
    return msd.clamp_min(0).sqrt()


# ------------------------------------------------------------------------------------------------- rigid frames
def inertial_axes(centred: torch.Tensor, mask: torch.Tensor, degenerate_tol: float = DEGENERATE_MOMENT_TOL
                  ) -> torch.Tensor:
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
    molecule_index = molecule_index.long()
    dense, mask, slot = pad_by_index(positions, molecule_index)
    centroid = masked_centroids(dense, mask)
    centred = (dense - centroid[:, None]) * mask[..., None].to(dense.dtype)
    axes = inertial_axes(centred, mask)
    body_dense = torch.einsum("mji,mpj->mpi", axes, centred)  # Rᵀ (x − T)
    return axes, centroid, body_dense[molecule_index, slot]


def fit_rigid_motion(body: torch.Tensor, positions: torch.Tensor, molecule_index: torch.Tensor):
    """Best rigid pose per molecule mapping body coordinates onto positions (Kabsch).

    Returns rotations [M, 3, 3], translations [M, 3] and the RMS residual per molecule [M] (Å).
    """
    b, mask, _ = pad_by_index(body, molecule_index)
    x, _, _ = pad_by_index(positions, molecule_index)
    w = mask.to(b.dtype)
    rot, trans = kabsch(b, x, w)
    fitted = atoms_from_poses(trans, rot, b)
    residual = (((fitted - x).pow(2).sum(-1) * w).sum(-1) / w.sum(-1)).sqrt()
    return rot, trans, residual


def atoms_from_poses(translations: torch.Tensor, rotations: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """x = T + R b: translations [..., 3], rotations [..., 3, 3], body [..., P, 3] -> [..., P, 3]."""
    return translations[..., None, :] + torch.einsum("...ij,...pj->...pi", rotations, body)
