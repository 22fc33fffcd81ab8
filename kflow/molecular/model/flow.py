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

__all__ = ["AssemblyBatch", "collate_clusters", "optimal_coupling", "equivariant_coupling", "RigidKFlow", "poses_from_chart", "RigidityError",
           "COUPLINGS"]

MIN_ROTATION_SCALE = 0.5  # Å: floor of the radius of gyration that scales rotation coordinates (tiny molecules)
# Which final slot each start molecule flows to: the data's pairing, an optimal assignment, or an optimal
# assignment and global rotation of the final cluster about the central molecule (``equivariant_coupling``).
COUPLINGS = ("index", "ot", "eot")


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


def _pair_fits(initial: torch.Tensor, final: torch.Tensor, mask: torch.Tensor):
    """Best rotation [B, M, M, 3, 3] and RMS residual [B, M, M] (Å) taking start molecule i onto final molecule j
    atom for atom (float64 inputs [B, M, P, 3], mask [B, M, P])."""
    b, m, p, _ = initial.shape
    w = mask.double()
    count = w.sum(-1).clamp_min(1)  # [B, M]
    c0 = (initial - masked_centroids(initial, mask)[:, :, None]) * w[..., None]
    c1 = (final - masked_centroids(final, mask)[:, :, None]) * w[..., None]
    mobile, target = c0[:, :, None].expand(b, m, m, p, 3), c1[:, None].expand(b, m, m, p, 3)
    pair_w = w[:, :, None].expand(b, m, m, p)
    rot, _ = kabsch(mobile, target, pair_w)
    moved = torch.einsum("bijxy,bipy->bijpx", rot, c0)
    residual = (((moved - target).square().sum(-1) * pair_w).sum(-1) / count[:, :, None]).sqrt()
    return rot, residual


def _pair_rules(residual: torch.Tensor, tolerance: float, free_pairs: bool):
    """(allowed [B, M, M] bool, extra cost [B, M, M] or None) of the coupling for the proper-fit RMS ``residual``
    [B, M, M] of each start/final pair. Allowed: pairs a proper rigid motion relates within ``tolerance`` Å, and
    the index pairs (rigid by assumption). With ``free_pairs`` (start copies made from one molecule) every pair is
    allowed and pays the mean squared atom residual of its proper fit (Å², ~0 for a pair of the same hand and
    conformer), so such a pair wins over an equally near mirror image or other conformer."""
    m = residual.shape[1]
    if free_pairs:
        return torch.ones_like(residual, dtype=torch.bool), residual.square()
    return (residual <= tolerance) | torch.eye(m, dtype=torch.bool, device=residual.device), None


def _principal_frames(points: torch.Tensor) -> torch.Tensor:
    """Principal axes [B, 3, 3] (columns, descending variance) of points [B, N, 3] about the origin."""
    _, vectors = torch.linalg.eigh(torch.einsum("bni,bnj->bij", points, points))
    return vectors.flip(-1)


def equivariant_coupling(initial: torch.Tensor, final: torch.Tensor, mask: torch.Tensor, central: bool = True,
                         iterations: int = 20, rigidity_tolerance: float = 1e-2, free_pairs: bool = False):
    """Permutation and global rotation of the final cluster that best fit the start (equivariant OT coupling).

    A start carries no information about the crystal's numbering *or* its orientation, so both are chosen to
    make the path short: with T⁰, T¹ the molecule centroids taken about a pivot (the central molecule 0 with
    ``central``, which is then always paired with final molecule 0; else the cluster centroid), minimise

        Σ_i |T⁰_i − R T¹_π(i)|²    over permutations π and proper rotations R

    by alternating Hungarian assignment (R fixed) and Kabsch (π fixed) until π stops changing; each step can only
    lower the cost. The alternation starts from the 4 proper sign choices of the principal-axes alignment of the
    two centroid clouds and the best result is kept, so the answer rotates with the target (an input frame never
    enters). Pairs of opposite handedness are excluded as in ``optimal_coupling``, or with ``free_pairs`` every
    pair is allowed at the extra cost of its proper-fit residual (included in the returned costs).

    Args: initial, final [B, M, P, 3] padded atoms (mask [B, M, P]), copies of one molecule in one atom order.
    Returns (π [B, M] long, R [B, 3, 3], pivots (p⁰ [B, 3], p¹ [B, 3]), cost [B], history [B, n] of the cost
    after every step of the best start): the coupled final cluster is R (x¹_π − p¹) + p⁰.
    """
    from scipy.optimize import linear_sum_assignment

    initial, final = initial.double(), final.double()
    b, m = initial.shape[:2]
    _, residual = _pair_fits(initial, final, mask)
    allowed, extra = _pair_rules(residual, rigidity_tolerance, free_pairs)
    if central:
        allowed[:, 0, :] = False
        allowed[:, :, 0] = False
        allowed[:, 0, 0] = True
    t0, t1 = masked_centroids(initial, mask), masked_centroids(final, mask)  # [B, M, 3]
    p0 = t0[:, 0] if central else t0.mean(1)
    p1 = t1[:, 0] if central else t1.mean(1)
    a, c = t0 - p0[:, None], t1 - p1[:, None]  # [B, M, 3] about the pivots
    frame_a, frame_c = _principal_frames(a), _principal_frames(c)
    signs = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=a.dtype)
    best = [None] * b
    for sign in signs:
        rot = frame_a @ torch.diag(sign) @ frame_c.transpose(1, 2)  # [B, 3, 3], proper: det = +1 per sign row
        rot = rot * torch.det(rot)[:, None, None]  # eigh's axes may form a left-handed frame: make R proper
        history = [[] for _ in range(b)]
        perm = None
        for _ in range(iterations):
            cost = torch.cdist(a, c @ rot.transpose(1, 2)).square()
            if extra is not None:
                cost = cost + extra
            cost = cost.masked_fill(~allowed, float("inf"))
            new = torch.stack([torch.as_tensor(linear_sum_assignment(ci)[1]) for ci in cost.numpy()])
            matched = torch.gather(c, 1, new[:, :, None].expand(-1, -1, 3))
            # [B] the extra cost of the chosen pairs (fixed while R moves)
            paid = [0.0] * b if extra is None else torch.gather(extra, 2, new[:, :, None])[..., 0].sum(1).tolist()
            for i in range(b):
                history[i].append(float((a[i] - matched[i] @ rot[i].T).square().sum()) + paid[i])
            rot, _ = kabsch(matched, a, translate=False)
            for i in range(b):
                history[i].append(float((a[i] - matched[i] @ rot[i].T).square().sum()) + paid[i])
            if perm is not None and torch.equal(new, perm):
                break
            perm = new
        for i in range(b):
            if best[i] is None or history[i][-1] < best[i][3] - 1e-9:
                best[i] = (perm[i], rot[i], None, history[i][-1], history[i])
    perm = torch.stack([x[0] for x in best])
    rot = torch.stack([x[1] for x in best])
    cost = torch.tensor([x[3] for x in best], dtype=a.dtype)
    return perm, rot, (p0, p1), cost, [x[4] for x in best]


def optimal_coupling(initial: torch.Tensor, final: torch.Tensor, mask: torch.Tensor,
                     rotation_scale: torch.Tensor | None = None, orientation_weight: float = 0.0,
                     rigidity_tolerance: float = 1e-2, free_pairs: bool = False) -> torch.Tensor:
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
    ``free_pairs`` (start copies made from one molecule, ``datasets.set_start_hands``, whose crystal copies may be
    its mirror image or, with several independent molecules, another conformer) allows every pair, with c(i, j)
    raised by the mean squared atom residual of the proper fit (Å²), so a pair of the same hand and conformer
    wins over an equally near other one.
    """
    from scipy.optimize import linear_sum_assignment

    if orientation_weight < 0:
        raise ValueError(f"orientation_weight must be >= 0, got {orientation_weight}")
    initial, final = initial.double(), final.double()
    rot, residual = _pair_fits(initial, final, mask)
    cost = torch.cdist(masked_centroids(initial, mask), masked_centroids(final, mask)).square()
    if orientation_weight > 0:
        if rotation_scale is None:
            raise ValueError("orientation_weight > 0 needs rotation_scale (the chart's ℓ per cluster)")
        scale = torch.as_tensor(rotation_scale, dtype=cost.dtype, device=cost.device).reshape(-1, 1, 1)
        cost = cost + orientation_weight * (scale * rotation_angle(rot)).square()
    allowed, extra = _pair_rules(residual, rigidity_tolerance, free_pairs)
    if extra is not None:
        cost = cost + extra
    cost = cost.masked_fill(~allowed, float("inf")).cpu().numpy()
    perm = torch.stack([torch.as_tensor(linear_sum_assignment(c)[1]) for c in cost])
    return perm.to(initial.device)


def collate_clusters(items: Sequence, dtype=torch.float32, rigidity_tolerance: float = 1e-2,
                     coupling: str = "index", orientation_weight: float = 0.0, central: bool = False,
                     free_pairs: bool = False) -> AssemblyBatch:
    """Build an ``AssemblyBatch`` from clusters (``Cluster`` objects, PyG ``Data`` or dicts with the fields
    atomic_numbers [N], molecule_index [N], initial_positions [N, 3], final_positions [N, 3]).

    ``coupling``: "index" pairs start molecule i with final molecule i, as the data lists them; "ot" re-assigns
    the final slots within each cluster by ``optimal_coupling`` (centroid distances, plus ``orientation_weight``
    × (ℓ × rotation angle)²) before the path is built: the final atoms of molecule i become those of molecule
    π(i). All molecules of a cluster are copies of one molecule with one atom order, so this is a relabelling of
    the final cluster (the same crystal), and the flow learns shorter, less crossed paths. "eot" also rotates the
    final cluster about its centroid onto the start (``equivariant_coupling``): the crystal's orientation in its
    file is as arbitrary as its numbering. With ``central`` (starts whose molecule 0 sits at their centre, the
    ``hard`` preset) "eot" pivots on molecule 0 and always pairs it with the crystal's central molecule 0;
    without it the pivot is the cluster centroid.

    ``free_pairs``: the start copies are rigid copies of one molecule (``datasets.set_start_hands``, as ``kflow
    assemble`` makes them from a lone molecule; or sampling, which never reads the final positions), while the
    crystal's copies may be its mirror image (inversion or mirror symmetry) or another conformer (several
    independent molecules: 10 % of the CSD-500 crystals, up to 2.8 Å RMS apart). A start molecule may then pair
    with any crystal molecule; its target is, like every pair's, the proper Kabsch pose of the start body on the
    final atoms (for a mirror image or another conformer, the nearest proper pose, at the final centroid), and
    "ot" and "eot" charge each pair its fit residual (``optimal_coupling``). No rigidity check then applies.

    Raises ``RigidityError`` naming the cluster and molecule when a final molecule is not a rigid copy of its
    initial one (RMS residual above ``rigidity_tolerance`` Å; not with ``free_pairs``), and ``ValueError`` for
    inconsistent molecules.
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
    residual = torch.zeros(b, m) if free_pairs else rigid_residuals(x0, x1, mask)  # [B, M]
    if (residual > rigidity_tolerance).any():
        ci, mi = (residual > rigidity_tolerance).nonzero()[0].tolist()
        raise RigidityError(f"cluster {parsed[ci][4]!r}, molecule {mi}: final atoms are not a rigid motion of the "
                            f"initial ones (RMS residual {residual[ci, mi]:.3g} Å > {rigidity_tolerance} Å)")
    # Radius of gyration of the molecule (identical copies: use molecule 0).
    count = w[:, 0].sum(-1)
    scale = ((body[:, 0].pow(2).sum(-1) * w[:, 0]).sum(-1) / count).sqrt().clamp_min(MIN_ROTATION_SCALE)
    if coupling == "ot":
        _check_identical_copies(z, parsed)
        perm = optimal_coupling(x0, x1, mask, scale, orientation_weight, rigidity_tolerance, free_pairs)
        x1 = torch.gather(x1, 1, perm[:, :, None, None].expand_as(x1))
        t1 = torch.gather(t1, 1, perm[:, :, None].expand_as(t1))
    elif coupling == "eot":
        _check_identical_copies(z, parsed)
        # Pivot: molecule 0 when the start has a central molecule; otherwise the cluster centroid (pinning an
        # off-centre start molecule 0 to the crystal's central one lengthens the paths: on the CSD-500 hard test
        # starts without a central molecule, RMS centroid displacement 7.60 Å about molecule 0, 5.35 about the
        # centroid, 6.69 with assignment alone).
        perm, rot_g, (p0, p1), _, _ = equivariant_coupling(x0, x1, mask, central=central,
                                                           rigidity_tolerance=rigidity_tolerance,
                                                           free_pairs=free_pairs)
        x1 = torch.gather(x1, 1, perm[:, :, None, None].expand_as(x1))
        x1 = torch.einsum("bij,bmpj->bmpi", rot_g, x1 - p1[:, None, None]) + p0[:, None, None]
        x1 = x1 * w[..., None]
        t1 = masked_centroids(x1, mask)
    rot, _ = kabsch(body, (x1 - t1[:, :, None]) * w[..., None], w)  # proper: for a mirror pair the nearest pose
    return AssemblyBatch(z, mask, body.to(dtype), t0.to(dtype), t1.to(dtype), rot.to(dtype), scale.to(dtype),
                         [q[4] for q in parsed])


def _check_identical_copies(z: torch.Tensor, parsed) -> None:
    different = (z != z[:, :1]).any(-1)  # [B, M]: atoms differ from molecule 0's
    if different.any():
        ci, mi = different.nonzero()[0].tolist()
        raise ValueError(f"cluster {parsed[ci][4]!r}: molecule {mi} has other elements (in atom order) than "
                         "molecule 0; an optimal coupling needs identical copies of one molecule")


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
