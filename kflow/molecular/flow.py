"""Rigid-body K-Flow for molecular assembly (docs/MATH.md, "Molecular assembly").

Each cluster has M rigid copies of one molecule. Poses are taken relative to the initial cluster:

    Z = (T − T⁰, ℓ · log(R R⁰ᵀ)) ∈ R^{M×6}

where T are molecule centroids (Å), R orientations and ℓ the molecule's radius of gyration (Å), which puts the
rotation coordinates in Å too, so one squared error weighs translations and rotations by the atom displacement
they cause. Z⁰ = 0 and Z¹ follows from the final cluster. K-Flow is the core engine on Z with the graph-Laplacian
decomposition over the M molecules, built from the initial centroid distances (known at sampling time):
Z_t = U (S(t) ⊙ Uᵀ Z¹). Because U depends only on distances, the path is SE(3)-equivariant; ℓ is a per-cluster
constant, so scaling the rotation chart commutes with U and does not change the path. One band is AssembleFlow-style
rigid flow matching (linear translations, geodesic rotations from the initial pose).

Layout: clusters are padded to dense tensors [B, M, P] (P = atoms per molecule, the same for every molecule of a
cluster). With R⁰ = I we take the body coordinates b = x⁰ − T⁰ of the initial cluster, and fit R¹ by Kabsch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from kflow.core import BandSchedule, KFlow, LaplacianDecomposition
from kflow.molecular.geometry import atoms_from_poses, kabsch, masked_centroids, pad_by_index, rigid_residuals
from kflow.molecular.so3 import exp_map, log_map, rotation_angle

__all__ = ["AssemblyBatch", "collate_clusters", "optimal_coupling", "RigidKFlow", "poses_from_chart", "RigidityError",
           "COUPLINGS"]

MIN_ROTATION_SCALE = 0.5  # Å: floor of the radius of gyration that scales rotation coordinates (tiny molecules)
COUPLINGS = ("index", "ot")  # which final slot each start molecule flows to: the data's pairing, or optimal


class RigidityError(ValueError):
    """The initial and final arrangement of a molecule are not related by a rigid motion."""


@dataclass
class AssemblyBatch:
    """Dense batch of clusters. B clusters, M molecules, P (padded) atoms per molecule."""

    atomic_numbers: torch.Tensor  # [B, M, P] long, 0 = padding
    mask: torch.Tensor  # [B, M, P] bool
    body: torch.Tensor  # [B, M, P, 3] body coordinates (initial orientation, centred at the centroid)
    initial_translations: torch.Tensor  # [B, M, 3] T⁰
    final_translations: torch.Tensor  # [B, M, 3] T¹
    final_rotations: torch.Tensor  # [B, M, 3, 3] R¹ R⁰ᵀ (R⁰ = I)
    rotation_scale: torch.Tensor  # [B] ℓ, radius of gyration (Å)
    names: list

    @property
    def num_clusters(self) -> int:
        return self.mask.shape[0]

    @property
    def num_molecules(self) -> int:
        return self.mask.shape[1]

    def to(self, device=None, dtype=None) -> "AssemblyBatch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
            out[f.name] = v
        return AssemblyBatch(**out)

    def initial_chart(self) -> torch.Tensor:
        return torch.zeros(*self.initial_translations.shape[:2], 6, dtype=self.body.dtype, device=self.body.device)

    def final_chart(self) -> torch.Tensor:
        """Z¹ [B, M, 6]."""
        rot = log_map(self.final_rotations) * self.rotation_scale[:, None, None]
        return torch.cat([self.final_translations - self.initial_translations, rot], -1)

    def initial_positions(self) -> torch.Tensor:
        return self.initial_translations[:, :, None] + self.body

    def final_positions(self) -> torch.Tensor:
        return atoms_from_poses(self.final_translations, self.final_rotations, self.body)

    def positions_from_chart(self, z: torch.Tensor) -> torch.Tensor:
        """Atom positions [B, M, P, 3] for chart coordinates z [B, M, 6] (padding atoms sit at their centroid)."""
        t, r = poses_from_chart(self.initial_translations, z, self.rotation_scale)
        return atoms_from_poses(t, r, self.body)


def poses_from_chart(initial_translations: torch.Tensor, z: torch.Tensor, rotation_scale: torch.Tensor):
    """Chart z [B, M, 6] -> (T [B, M, 3], R [B, M, 3, 3]) with R⁰ = I."""
    t = initial_translations + z[..., :3]
    r = exp_map(z[..., 3:] / rotation_scale[:, None, None])
    return t, r


def _cluster_fields(item):
    """(atomic_numbers [N], molecule_index [N], initial [N, 3], final [N, 3], name) from a Data or Cluster."""
    get = (lambda k: item[k]) if isinstance(item, dict) else (lambda k: getattr(item, k))
    name = getattr(item, "name", None) if not isinstance(item, dict) else item.get("name")
    return (torch.as_tensor(get("atomic_numbers")).long(), torch.as_tensor(get("molecule_index")).long(),
            torch.as_tensor(get("initial_positions")), torch.as_tensor(get("final_positions")), name)


def optimal_coupling(initial: torch.Tensor, final: torch.Tensor, mask: torch.Tensor,
                     rotation_scale: torch.Tensor | None = None, orientation_weight: float = 0.0,
                     rigidity_tolerance: float = 1e-2) -> torch.Tensor:
    """Optimal assignment of start molecules to final slots within each cluster of identical molecules.

    For padded atoms initial, final [B, M, P, 3] (mask [B, M, P]; every molecule of a cluster the same molecule,
    atoms in the same order) returns π [B, M]: start molecule i flows to final molecule π(i), the permutation
    that minimises Σ_i c(i, π(i)) (``scipy.optimize.linear_sum_assignment``, one call per cluster) with

        c(i, j) = |T⁰_i − T¹_j|² + w (ℓ θ_ij)²

    T the molecule centroids, θ_ij the angle of the best rotation taking start molecule i onto final molecule j
    atom for atom, ℓ = ``rotation_scale`` [B] (the chart's rotation scale, Å) and w = ``orientation_weight`` (0:
    centroids only). Pairs that no proper rigid motion relates (RMS residual above ``rigidity_tolerance`` Å: the
    copies of opposite handedness in a crystal with mirror or inversion symmetry, unless the molecule is planar)
    are excluded, so every coupled pair is rigid; the index pairing, rigid by assumption, always qualifies.
    """
    from scipy.optimize import linear_sum_assignment

    if orientation_weight < 0:
        raise ValueError(f"orientation_weight must be >= 0, got {orientation_weight}")
    b, m, p, _ = initial.shape
    initial, final = initial.double(), final.double()
    w = mask.double()
    count = w.sum(-1).clamp_min(1)  # [B, M]
    c0 = (initial - masked_centroids(initial, mask)[:, :, None]) * w[..., None]
    c1 = (final - masked_centroids(final, mask)[:, :, None]) * w[..., None]
    # Best rotation and RMS residual of every (start i, final j) pair: [B, M, M].
    mobile, target = c0[:, :, None].expand(b, m, m, p, 3), c1[:, None].expand(b, m, m, p, 3)
    pair_w = w[:, :, None].expand(b, m, m, p)
    rot, _ = kabsch(mobile, target, pair_w)
    moved = torch.einsum("bijxy,bipy->bijpx", rot, c0)
    residual = (((moved - target).square().sum(-1) * pair_w).sum(-1) / count[:, :, None]).sqrt()
    cost = torch.cdist(masked_centroids(initial, mask), masked_centroids(final, mask)).square()
    if orientation_weight > 0:
        if rotation_scale is None:
            raise ValueError("orientation_weight > 0 needs rotation_scale (the chart's ℓ per cluster)")
        scale = torch.as_tensor(rotation_scale, dtype=cost.dtype, device=cost.device).reshape(-1, 1, 1)
        cost = cost + orientation_weight * (scale * rotation_angle(rot)).square()
    allowed = (residual <= rigidity_tolerance) | torch.eye(m, dtype=torch.bool, device=cost.device)
    cost = cost.masked_fill(~allowed, float("inf")).cpu().numpy()
    perm = torch.stack([torch.as_tensor(linear_sum_assignment(c)[1]) for c in cost])
    return perm.to(initial.device)


def collate_clusters(items: Sequence, dtype=torch.float32, rigidity_tolerance: float = 1e-2,
                     coupling: str = "index", orientation_weight: float = 0.0) -> AssemblyBatch:
    """Build an ``AssemblyBatch`` from clusters (``Cluster`` objects, PyG ``Data`` or dicts with the fields
    atomic_numbers [N], molecule_index [N], initial_positions [N, 3], final_positions [N, 3]).

    ``coupling``: "index" pairs start molecule i with final molecule i, as the data lists them; "ot" re-assigns
    the final slots within each cluster by ``optimal_coupling`` (centroid distances, plus ``orientation_weight``
    × (ℓ × rotation angle)²) before the path is built: the final atoms of molecule i become those of molecule
    π(i). All molecules of a cluster are copies of one molecule with one atom order, so this is a relabelling of
    the final cluster (the same crystal), and the flow learns shorter, less crossed paths.

    Raises ``RigidityError`` naming the cluster and molecule when a final molecule is not a rigid copy of its
    initial one (RMS residual above ``rigidity_tolerance`` Å), and ``ValueError`` for inconsistent molecules.
    """
    if len(items) == 0:
        raise ValueError("collate_clusters got an empty list of clusters")
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    parsed = [_cluster_fields(it) for it in items]
    num_mol = {int(mi.max()) + 1 for _, mi, _, _, _ in parsed}
    if len(num_mol) != 1:
        raise ValueError(f"clusters in one batch must have the same number of molecules, got {sorted(num_mol)}")
    m = num_mol.pop()
    per_mol = [torch.bincount(mi, minlength=m) for _, mi, _, _, _ in parsed]
    for (_, _, _, _, name), counts in zip(parsed, per_mol):
        if (counts != counts[0]).any():
            raise ValueError(f"cluster {name!r}: molecules have different atom counts {counts.tolist()}; "
                             "every molecule of a cluster must be a copy of the same molecule")
    # All atoms of the batch padded by (cluster, molecule) in one scatter; atoms keep their order in a molecule.
    b = len(parsed)
    molecule = torch.cat([i * m + mi for i, (_, mi, _, _, _) in enumerate(parsed)])  # [N] global molecule id
    atoms = torch.cat([torch.cat([zi[:, None].double(), pi0.double(), pi1.double()], -1)
                       for zi, _, pi0, pi1, _ in parsed])  # [N, 7]: Z, initial xyz, final xyz
    dense, mask, _ = pad_by_index(atoms, molecule, b * m)
    p = dense.shape[1]
    dense, mask = dense.reshape(b, m, p, 7), mask.reshape(b, m, p)
    z, x0, x1 = dense[..., 0].long(), dense[..., 1:4], dense[..., 4:7]
    if not (torch.isfinite(x0).all() and torch.isfinite(x1).all()):
        raise ValueError("cluster positions contain NaN or inf")
    w = mask.double()
    t0, t1 = masked_centroids(x0, mask), masked_centroids(x1, mask)  # [B, M, 3]
    body = (x0 - t0[:, :, None]) * w[..., None]
    residual = rigid_residuals(x0, x1, mask)  # [B, M]
    if (residual > rigidity_tolerance).any():
        ci, mi = (residual > rigidity_tolerance).nonzero()[0].tolist()
        raise RigidityError(f"cluster {parsed[ci][4]!r}, molecule {mi}: final atoms are not a rigid motion of the "
                            f"initial ones (RMS residual {residual[ci, mi]:.3g} Å > {rigidity_tolerance} Å)")
    # Radius of gyration of the molecule (identical copies: use molecule 0).
    count = w[:, 0].sum(-1)
    scale = ((body[:, 0].pow(2).sum(-1) * w[:, 0]).sum(-1) / count).sqrt().clamp_min(MIN_ROTATION_SCALE)
    if coupling == "ot":
        different = (z != z[:, :1]).any(-1)  # [B, M]: atoms differ from molecule 0's
        if different.any():
            ci, mi = different.nonzero()[0].tolist()
            raise ValueError(f"cluster {parsed[ci][4]!r}: molecule {mi} has other elements (in atom order) than "
                             "molecule 0; coupling='ot' needs identical copies of one molecule")
        perm = optimal_coupling(x0, x1, mask, scale, orientation_weight, rigidity_tolerance)
        x1 = torch.gather(x1, 1, perm[:, :, None, None].expand_as(x1))
        t1 = torch.gather(t1, 1, perm[:, :, None].expand_as(t1))
    rot, _ = kabsch(body, (x1 - t1[:, :, None]) * w[..., None], w)
    return AssemblyBatch(z, mask, body.to(dtype), t0.to(dtype), t1.to(dtype), rot.to(dtype), scale.to(dtype),
                         [q[4] for q in parsed])


class RigidKFlow:
    """The core K-Flow on the rigid-body chart of a batch of clusters.

    Args:
        num_bands: K (1 = rigid flow matching baseline).
        ramp, order, overlap: passed to ``BandSchedule``.
        sigma: Laplacian kernel width in Å (default: per-cluster median centroid distance).
        normalized: use the normalised graph Laplacian.
        regression: the direct-regression baseline instead of a flow: trained only at t = 0 (the network maps the
            start cluster to the final one) and sampled in one step; needs ``num_bands=1``.
    """

    def __init__(self, num_bands: int = 2, ramp: str = "linear", order: str = "low_to_high", overlap: float = 0.0,
                 sigma: float | None = None, normalized: bool = False, regression: bool = False):
        if regression and num_bands != 1:
            raise ValueError(f"direct regression has no bands: num_bands must be 1, got {num_bands}")
        self.schedule = BandSchedule(num_bands, ramp=ramp, order=order, overlap=overlap)
        self.sigma, self.normalized, self.regression = sigma, normalized, regression

    @property
    def num_bands(self) -> int:
        return self.schedule.num_bands

    def for_batch(self, batch: AssemblyBatch) -> KFlow:
        """A KFlow whose decomposition is the Laplacian basis of each cluster's initial centroids."""
        dec = LaplacianDecomposition(batch.initial_translations, self.num_bands, sigma=self.sigma,
                                     normalized=self.normalized)
        return KFlow(dec, self.schedule, prediction="x1")
