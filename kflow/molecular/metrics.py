"""Assembly metrics: packing matching (AssembleFlow-compatible), collisions, separation, COMPACK-like RMSD_15.

Inputs follow the PyG convention: atoms of several clusters concatenated, with ``batch`` [N] giving each atom's
cluster and ``molecule_index`` [N] the molecule within its cluster (0 = central molecule). A single cluster may be
passed without ``batch``. Every metric takes torch tensors, numpy arrays or nested lists; called with numpy arrays
or lists it returns numpy arrays, with tensors it returns tensors. Everything is computed on padded [B, N_max, ...] tensors in chunks of clusters, so no
Python loop runs over atoms (the Hungarian step of RMSD_15 loops over clusters; it is a 15×17 assignment; the
permutation-invariant packing matching of ``match_molecules`` loops over clusters and start orientations for its
17×17 assignments).
"""
from __future__ import annotations

import functools
import inspect
import itertools
from typing import NamedTuple

import numpy as np
import torch

from kflow.molecular.geometry import index_centroids, kabsch, pad_by_index

__all__ = [
    "PackingMatching",
    "compute_packing_matching",
    "match_molecules",
    "permute_molecules",
    "collision_rate",
    "separation_rate",
    "rmsd15",
    "aggregate_min_over_repeats",
]

PAIR_CHUNK_ELEMENTS = 1_000_000  # [chunk, A, A] pair tensors of ~1M elements stay in cache: several times faster
CONTACT_CHUNK_ELEMENTS = 8_000_000  # contact metrics keep several such tensors alive at once


class PackingMatching(NamedTuple):
    pm_atom: torch.Tensor  # [B] Å
    pm_center: torch.Tensor  # [B] Å


# ----------------------------------------------------------------------------------------------------- validation
_INDEX_ARGUMENTS = ("molecule_index", "batch", "atomic_numbers")


def _as_tensor(name: str, value):
    """A metric argument as a tensor: positions as float64, indices as int64 (refusing non-integer values)."""
    if value is None or torch.is_tensor(value):
        tensor = value
    else:
        array = np.asarray(value)
        if array.dtype == object:
            raise ValueError(f"{name}: not a numeric array (ragged nested lists or objects)")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor is not None and name in _INDEX_ARGUMENTS:
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got {tensor.dtype} (a float index would silently "
                             "truncate)")
        tensor = tensor.long()
    return tensor


def _accepts_arrays(metric):
    """Let ``metric`` take numpy arrays and lists; its tensors come back as numpy arrays when the inputs were."""
    signature = inspect.signature(metric)

    @functools.wraps(metric)
    def wrapper(*args, **kwargs):
        bound = dict(signature.bind(*args, **kwargs).arguments)
        from_numpy = any(v is not None and not torch.is_tensor(v) for k, v in bound.items()
                         if k.endswith("positions") or k in _INDEX_ARGUMENTS)
        bound = {k: _as_tensor(k, v) if (k.endswith("positions") or k in _INDEX_ARGUMENTS) else v
                 for k, v in bound.items()}
        out = metric(**bound)
        if not from_numpy:
            return out
        if isinstance(out, tuple):
            return type(out)(*(x.cpu().numpy() for x in out))
        return out.cpu().numpy()

    return wrapper


def _validate(true_positions, pred_positions, molecule_index, batch, atomic_numbers=None):
    if true_positions.dim() != 2 or true_positions.shape[-1] != 3:
        raise ValueError(f"true_positions must be [N, 3], got {tuple(true_positions.shape)}")
    if pred_positions is not None and pred_positions.shape != true_positions.shape:
        raise ValueError(f"pred_positions has shape {tuple(pred_positions.shape)}, expected "
                         f"{tuple(true_positions.shape)} (same atoms as true_positions)")
    n = true_positions.shape[0]
    if n == 0:
        raise ValueError("true_positions is empty (no atoms)")
    if molecule_index.shape != (n,):
        raise ValueError(f"molecule_index must be [N]=[{n}], got {tuple(molecule_index.shape)}")
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=true_positions.device)
    elif batch.shape != (n,):
        raise ValueError(f"batch must be [N]=[{n}], got {tuple(batch.shape)}")
    elif (batch[1:] < batch[:-1]).any():
        raise ValueError("batch must be sorted (atoms of each cluster contiguous, as in torch_geometric batches)")
    else:
        ids = torch.unique_consecutive(batch)
        if ids[0] != 0 or (ids[1:] - ids[:-1] != 1).any():
            missing = sorted(set(range(int(ids[-1]) + 1)) - set(ids.tolist()))[:5]
            raise ValueError(f"batch ids must run 0..B-1 without gaps: got ids {ids[:6].tolist()}..., no atoms for "
                             f"cluster(s) {missing} (renumber the clusters, e.g. torch.unique(batch, "
                             "return_inverse=True))")
    if atomic_numbers is not None and atomic_numbers.shape != (n,):
        raise ValueError(f"atomic_numbers must be [N]=[{n}], got {tuple(atomic_numbers.shape)}")
    for name, x in (("true_positions", true_positions), ("pred_positions", pred_positions)):
        if x is not None and not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).any(-1).nonzero()[0, 0].item()
            raise ValueError(f"{name} contains NaN or inf (first at atom {bad})")
    if molecule_index.min() < 0:
        raise ValueError("molecule_index has negative entries")
    return batch.long(), molecule_index.long()


def _to_dense(x, batch, num_clusters, fill=0.0):
    """[N, ...] concatenated -> [B, N_max, ...] padded, and the [B, N_max] mask."""
    dense, mask, _ = pad_by_index(x, batch, num_clusters, fill)
    return dense, mask


class _Dense(NamedTuple):
    true: torch.Tensor  # [B, A, 3]
    pred: torch.Tensor | None  # [B, A, 3]
    mol: torch.Tensor  # [B, A] molecule id (-1 = padding)
    mask: torch.Tensor  # [B, A]
    z: torch.Tensor | None  # [B, A] atomic numbers (0 = padding)
    num_molecules: int
    true_centroids: torch.Tensor  # [B, M, 3] unweighted centroids of the true molecules


def _densify(true_positions, pred_positions, molecule_index, batch, atomic_numbers=None) -> _Dense:
    batch, molecule_index = _validate(true_positions, pred_positions, molecule_index, batch, atomic_numbers)
    num_clusters = int(batch.max()) + 1
    true, mask = _to_dense(true_positions, batch, num_clusters)
    pred = _to_dense(pred_positions, batch, num_clusters)[0] if pred_positions is not None else None
    mol = _to_dense(molecule_index, batch, num_clusters, fill=-1)[0]
    z = _to_dense(atomic_numbers.long(), batch, num_clusters)[0] if atomic_numbers is not None else None
    num_molecules = _check_molecules(batch, molecule_index, num_clusters)
    centroids = index_centroids(true_positions.double(), batch * num_molecules + molecule_index,
                                num_clusters * num_molecules).reshape(num_clusters, num_molecules, 3)
    return _Dense(true, pred, mol, mask, z, num_molecules, centroids)


def _cdist(a, b):
    """Exact pairwise distances (the matmul shortcut of cdist loses ~1e-8 Å near zero distance)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _gram_distances(pos, mask):
    """[b, A, 3], [b, A] -> [b, A, A] pairwise distances of centred coordinates from one batched matmul.

    |x_i − x_j|² = [−2x_i, |x_i|², 1] · [x_j, 1, |x_j|²]: a single K=5 matmul writes the squared distances, with no
    [b, A, A] temporaries. Padded atoms get all-zero factors, so their rows and columns are exactly 0 in every
    distance matrix and drop out of differences without a mask pass. Centring keeps |x| ~ the cluster radius, so for
    atoms >= 0.1 Å apart the float64 cancellation error is below 1e-12 Å; the diagonal is zeroed explicitly.
    """
    w = mask.to(pos.dtype)[..., None]  # [b, A, 1]
    centred = (pos - (pos * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)) * w
    sq = centred.square().sum(-1, keepdim=True)  # [b, A, 1]
    left = torch.cat([-2 * centred, sq, w], -1)  # [b, A, 5]
    right = torch.cat([centred, w, sq], -1)
    d2 = torch.bmm(left, right.transpose(1, 2))
    d2.diagonal(dim1=1, dim2=2).zero_()
    return d2.clamp_min_(0).sqrt_()


def _cluster_chunks(counts: list[int], budget: int):
    """Yield (s, e, lo, hi, max_atoms) for runs of clusters s..e-1 (atoms lo..hi-1 when concatenated) whose padded
    [e-s, A, A] pair tensors hold at most ``budget`` elements, A = the largest cluster of that run. Padding per
    chunk, not to the largest cluster overall, keeps one big cluster from inflating the cost of all others."""
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    s = 0
    while s < len(counts):
        e, biggest = s + 1, counts[s]
        while e < len(counts) and (e + 1 - s) * max(biggest, counts[e]) ** 2 <= budget:
            biggest = max(biggest, counts[e])
            e += 1
        yield s, e, offsets[s], offsets[e], biggest
        s = e


def _check_molecules(batch, molecule_index, num_clusters) -> int:
    """Number of molecules M; every cluster must contain every molecule 0..M-1 (a missing one would silently
    shrink PM-center)."""
    num_molecules = int(molecule_index.max()) + 1
    present = torch.zeros(num_clusters, num_molecules, dtype=torch.bool, device=batch.device)
    present[batch, molecule_index] = True
    if not present.all():
        c, m = (~present).nonzero()[0].tolist()
        raise ValueError(f"molecule_index: cluster {c} has no atoms of molecule {m} "
                         f"(expected molecules 0..{num_molecules - 1} in every cluster)")
    return num_molecules


# ------------------------------------------------------------------------------------------------ packing matching
@_accepts_arrays
@torch.no_grad()
def compute_packing_matching(true_positions: torch.Tensor, pred_positions: torch.Tensor,
                             molecule_index: torch.Tensor, batch: torch.Tensor | None = None,
                             permutation_invariant: bool = False) -> PackingMatching:
    """Packing matching of predicted vs true clusters, as AssembleFlow defines it.

    PM-atom = sqrt(mean_{i,j} (D_true[i, j] − D_pred[i, j])²) over the full N×N all-atom distance matrix of a
    cluster (hydrogens included, diagonal included, no alignment: distances are invariant anyway). PM-center is
    the same on the M×M matrix of molecule centroids (unweighted mean of each molecule's atoms).

    With ``permutation_invariant`` the predicted molecules are first relabelled to the true ones, since with M
    identical molecules the index pairing of a prediction is arbitrary (a packer or a start drawn independently
    of the crystal has none): each metric is the minimum of its index-paired value over the candidate
    permutations of ``match_molecules`` (docs/MATH.md §5). The exact
    minimum over all M! permutations is a quadratic assignment problem; the candidates make this an upper bound on
    it that does not depend on how the predicted molecules are labelled. Needs identical molecules (the same
    atom count in every molecule of a cluster, atoms in the same order).

    Args:
        true_positions, pred_positions: [N, 3] Å, atoms of one or several clusters (same atom order).
        molecule_index: [N] molecule of each atom within its cluster (0..M-1).
        batch: [N] cluster of each atom (sorted), or None for a single cluster.
        permutation_invariant: match molecules before comparing (default: AssembleFlow's index pairing).
    Returns:
        PackingMatching(pm_atom [B], pm_center [B]) in Å, float64.
    """
    batch, molecule_index = _validate(true_positions, pred_positions, molecule_index, batch)
    true, pred = true_positions.double(), pred_positions.double()
    if not permutation_invariant:
        return _paired_packing_matching(true, pred, molecule_index, batch)
    _, pm = _invariant_candidates(true, pred, molecule_index, batch)
    return PackingMatching(pm.pm_atom.min(0).values, pm.pm_center.min(0).values)


def _paired_packing_matching(true, pred, molecule_index, batch) -> PackingMatching:
    """Index-paired PM-atom and PM-center of validated float64 inputs."""
    num_clusters = int(batch.max()) + 1
    num_molecules = _check_molecules(batch, molecule_index, num_clusters)
    pm_atom = torch.empty(num_clusters, dtype=torch.float64, device=true.device)
    for s, e, lo, hi, _ in _cluster_chunks(torch.bincount(batch).tolist(), PAIR_CHUNK_ELEMENTS):
        local = batch[lo:hi] - s
        t, mask = _to_dense(true[lo:hi], local, e - s)
        p, _ = _to_dense(pred[lo:hi], local, e - s)
        diff = _gram_distances(t, mask)
        diff -= _gram_distances(p, mask)  # [b, A, A], zero on padding
        count = mask.sum(1).double()
        pm_atom[s:e] = torch.linalg.vector_norm(diff, dim=(1, 2)) / count
    key, num_groups = batch * num_molecules + molecule_index, num_clusters * num_molecules
    ct = index_centroids(true, key, num_groups).reshape(num_clusters, num_molecules, 3)
    cp = index_centroids(pred, key, num_groups).reshape(num_clusters, num_molecules, 3)
    pm_center = (_cdist(ct, ct) - _cdist(cp, cp)).pow(2).mean((1, 2)).sqrt()
    return PackingMatching(pm_atom, pm_center)


# ------------------------------------------------------------------------------ permutation-invariant matching
MATCH_CRITERIA = ("pm_center", "pm_atom")
MATCH_CANDIDATES_PER_SEARCH = 1  # best distinct results kept from each of the two searches (centroid, atom level)
MATCH_REFINED = 8  # best centroid-search results per cluster refined by pair exchanges
MATCH_MAX_ITERATIONS = 30  # alternating Hungarian / Kabsch rounds per start (they converge in a few)


class _MoleculeLayout(NamedTuple):
    key: torch.Tensor  # [N] cluster * M + molecule
    slot: torch.Tensor  # [N] position of each atom within its molecule
    mask: torch.Tensor  # [B, M, P] real atoms of the dense per-molecule layout
    num_clusters: int
    num_molecules: int


def _molecule_layout(batch, molecule_index) -> _MoleculeLayout:
    """Per-molecule dense layout of validated indices; refuses molecules of different sizes within a cluster."""
    num_clusters = int(batch.max()) + 1
    num_molecules = _check_molecules(batch, molecule_index, num_clusters)
    key = batch * num_molecules + molecule_index
    counts = torch.bincount(key, minlength=num_clusters * num_molecules).view(num_clusters, num_molecules)
    if (counts != counts[:, :1]).any():
        c = int((counts != counts[:, :1]).any(1).nonzero()[0, 0])
        raise ValueError(f"cluster {c}: molecules have different atom counts {counts[c].tolist()}; matching "
                         "molecules needs identical copies (same atoms in the same order)")
    _, mask, slot = pad_by_index(key[:, None], key, num_clusters * num_molecules)
    return _MoleculeLayout(key, slot, mask.view(num_clusters, num_molecules, -1), num_clusters, num_molecules)


def _molecule_atoms(positions, layout: _MoleculeLayout):
    """[N, 3] -> [B, M, P, 3], each molecule's atoms in their order (padding 0)."""
    dense, _, _ = pad_by_index(positions, layout.key, layout.num_clusters * layout.num_molecules)
    return dense.view(*layout.mask.shape, 3)


def _permute(positions, layout: _MoleculeLayout, permutation):
    """Positions [N, 3] with molecule i of cluster b taken from molecule ``permutation[b, i]`` (same atom slots)."""
    dense = _molecule_atoms(positions, layout)
    m = layout.num_molecules
    cluster, molecule = layout.key // m, layout.key % m
    return dense[cluster, permutation[cluster, molecule], layout.slot]


@functools.lru_cache(maxsize=1)
def _signed_permutation_matrices() -> torch.Tensor:
    """The 48 signed permutation matrices [48, 3, 3]: every way to map one set of principal axes onto another."""
    mats = []
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = torch.zeros(3, 3, dtype=torch.float64)
            m[torch.arange(3), torch.tensor(order)] = torch.tensor(signs, dtype=torch.float64)
            mats.append(m)
    return torch.stack(mats)


def _lexsort_molecules(points):
    """[B, M, 3] -> [B, M] order sorting each cluster's points by x, then y, then z (stable)."""
    order = torch.arange(points.shape[1], device=points.device).expand(points.shape[0], -1)
    for axis in (2, 1, 0):  # least significant key first
        keys = torch.gather(points[..., axis], 1, order)
        order = torch.gather(order, 1, torch.argsort(keys, dim=1, stable=True))
    return order


def _best_rotation(cov):
    """Proper rotation R maximising <R, cov> = tr(Rᵀ cov) for cov [..., 3, 3], and that maximum (Kabsch)."""
    u, s, vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.det(u @ vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    d = torch.ones_like(s)
    d[..., -1] = sign
    return u @ torch.diag_embed(d) @ vh, (s * d).sum(-1)


def _alternate_assignment(h, starts, max_iterations):
    """Superpose the prediction on the truth from every start rotation by alternating a Hungarian assignment with
    a Kabsch rotation of the matched molecules, until the assignment repeats.

    h [B, M, M, 3, 3]: h[b, i, j] = Σ_k t_ik p_jkᵀ over the points k that represent true molecule i and
    predicted molecule j (their centroids, or all their atoms), both clusters centred, so that
    Σ_i |t_i − R p_π(i)|² = const − 2 Σ_i <R, h_iπ(i)>. starts [B, S, 3, 3] orthogonal: a reflection start mirrors
    the prediction and continues with proper rotations (PM depends on distances only, so mirror images count as
    equal). Starts that reach the assignment of an earlier start of their cluster (same handedness) would repeat
    its path and are dropped. Returns, for the R surviving starts: cluster [R], assignment [R, M]
    (assignment[r, i] = the predicted molecule matched to true molecule i), the superposed squared distance minus
    its constant [R], and the final orthogonal superposition [R, 3, 3] (improper for mirrored starts).
    """
    from scipy.optimize import linear_sum_assignment

    num_clusters, num_starts = starts.shape[:2]
    m = h.shape[1]
    flip = torch.sign(torch.linalg.det(starts)).reshape(-1)  # [R]
    cluster = torch.arange(num_clusters, device=h.device).repeat_interleave(num_starts)  # [R]
    rot = starts.reshape(-1, 3, 3) * flip[:, None, None]  # proper; the mirror goes into h
    perm = np.full((len(cluster), m), -1, dtype=np.int64)
    alive = np.ones(len(cluster), dtype=bool)  # not a duplicate of an earlier start
    active = alive.copy()  # alive and still changing
    key_head = np.stack([cluster.cpu().numpy(), flip.cpu().numpy().astype(np.int64)], 1)
    h_flat = h.reshape(num_clusters, m * m, 9).transpose(1, 2)  # [B, 9, M²]
    for _ in range(max_iterations):
        # cost[r, i, j] = −<R_r, h_ij> × flip_r for every start of every cluster: one batched matmul
        weights = (rot * flip[:, None, None]).reshape(num_clusters, num_starts, 9)
        cost = -(weights @ h_flat).reshape(-1, m, m).cpu().numpy()
        rows = np.nonzero(active)[0]
        new = np.stack([linear_sum_assignment(cost[r])[1] for r in rows])
        active[rows] = (new != perm[rows]).any(1)
        perm[rows] = new
        # Two starts of a cluster with the same handedness and assignment follow the same path from now on.
        living = np.nonzero(alive)[0]
        first = _first_occurrences(np.concatenate([key_head[living], perm[living]], 1))
        keep = np.zeros(len(living), dtype=bool)
        keep[first] = True
        alive[living[~keep]] = False
        active &= alive
        if not active.any():
            break
        rows = torch.as_tensor(np.nonzero(active)[0], device=h.device)
        rot[rows] = _best_rotation(_matched_covariance(h, cluster[rows], perm[active], flip[rows]))[0]
    rows = torch.as_tensor(np.nonzero(alive)[0], device=h.device)
    perm = torch.as_tensor(perm[alive], device=h.device)
    rot, value = _best_rotation(_matched_covariance(h, cluster[rows], perm, flip[rows]))
    return cluster[rows], perm, -value, rot * flip[rows, None, None]


def _first_occurrences(rows: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of every distinct row of an integer array [R, K]."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    return np.unique(rows.view(np.dtype((np.void, 8 * rows.shape[1]))).ravel(), return_index=True)[1]


def _matched_covariance(h, cluster, perm, flip):
    """Σ_i h[cluster, i, perm[i]] × flip: the cross-covariance of an assignment, [R, 3, 3]."""
    perm = torch.as_tensor(perm, device=h.device)
    i = torch.arange(perm.shape[1], device=h.device)
    return h[cluster[:, None], i, perm].sum(1) * flip[:, None, None]


def _pm_center_sums(dt, dp, cluster, perm):
    """Σ_ij (dt_ij − dp_π(i)π(j))² [R] of assignments perm [R, M] of the given clusters."""
    q = dp[cluster[:, None, None], perm[:, :, None], perm[:, None, :]]
    return (dt[cluster] - q).square().sum((-1, -2))


def _swap_descent(dt, dp, perm, max_rounds):
    """Improve assignments perm [R, M] of the PM-center objective f = Σ_ij (dt_ij − dp_π(i)π(j))² by the best
    exchange of two molecules' partners while one lowers f. dt [R, M, M], dp [R, M, M]: the centroid distance
    matrices (symmetric, zero diagonal) of each row's cluster. Returns (perm, f [R])."""
    m = perm.shape[-1]
    eye = torch.eye(m, dtype=torch.bool, device=perm.device)
    perm = perm.clone()
    f = torch.empty(len(perm), dtype=dt.dtype, device=dt.device)
    active = torch.arange(len(perm), device=perm.device)
    for _ in range(max_rounds + 1):
        t, p = dt[active], perm[active]
        q = dp[active[:, None, None], p[:, :, None], p[:, None, :]]  # [r, M, M] predicted distances in true order
        f[active] = (t - q).square().sum((-1, -2))
        # Exchanging the partners of true molecules a and b changes f by −4 (G + Gᵀ − g_a − g_b + 2 T∘Q)_ab with
        # G = T Q and g = diag(G): only rows and columns a and b of Q move (docs/MATH.md).
        g = t @ q
        diag = g.diagonal(dim1=-2, dim2=-1)
        delta = -4 * (g + g.transpose(-1, -2) - diag[:, :, None] - diag[:, None, :] + 2 * t * q)
        gain, where = delta.masked_fill(eye, 0).flatten(-2).min(-1)
        improve = gain < -1e-10 * (1 + f[active])  # a relative margin: rounding never drives a swap
        if not improve.any():
            break
        active, where = active[improve], where[improve]
        a, b = where // m, where % m
        pa, pb = perm[active, a], perm[active, b]
        perm[active, a], perm[active, b] = pb, pa
    return perm, f


def _best_per_cluster(cluster, perm, score, keep: int):
    """The ``keep`` distinct assignments of lowest score of every cluster, sorted by cluster, then score (ties:
    the earlier row)."""
    rank = torch.as_tensor(np.lexsort((np.arange(len(score)), score.cpu().numpy(), cluster.cpu().numpy())),
                           device=perm.device)
    cluster, perm, score = cluster[rank], perm[rank], score[rank]
    first = np.sort(_first_occurrences(np.concatenate([cluster[:, None].cpu().numpy(), perm.cpu().numpy()], 1)))
    cl = cluster.cpu().numpy()[first]  # distinct rows, still by cluster then score
    position = np.arange(len(first)) - np.searchsorted(cl, cl)  # rank within its cluster
    first = torch.as_tensor(first[position < keep], device=perm.device)
    return rank[first], cluster[first], perm[first], score[first]


def _slots(cluster, num_clusters: int, num: int):
    """Row indices [num, B] of the first ``num`` rows of each cluster in rows sorted by cluster (every cluster
    has at least one), its first row repeated where it has fewer."""
    start = torch.searchsorted(cluster, torch.arange(num_clusters, device=cluster.device))
    count = torch.bincount(cluster, minlength=num_clusters)
    offset = torch.arange(num, device=cluster.device)[:, None]
    return start[None] + torch.where(offset < count[None], offset, 0)


def _candidate_permutations(true, pred, layout: _MoleculeLayout, per_search: int = MATCH_CANDIDATES_PER_SEARCH,
                            max_iterations: int = MATCH_MAX_ITERATIONS):
    """Distinct candidate assignments [C, B, M] (the predicted molecule matched to each true molecule), lowest
    PM-center first, and their PM-center [C, B]; C = 2 × ``per_search``, a cluster with fewer distinct candidates
    repeats its best. Two searches (``match_molecules``): on centroids from 50 starts, refined by pair exchanges
    on PM-center, then on all atoms (orientation-aware, for PM-atom) from the best centroid superpositions.

    The searches see the predicted molecules only in a canonical order (centroids sorted lexicographically), so
    the result does not depend on how they were labelled."""
    m, num_clusters = layout.num_molecules, layout.num_clusters
    mask = layout.mask[..., None].to(true.dtype)
    atoms_t, atoms_p = _molecule_atoms(true, layout), _molecule_atoms(pred, layout)  # [B, M, P, 3]
    count = mask.sum(2)  # [B, M, 1]
    ct, cp = atoms_t.sum(2) / count, atoms_p.sum(2) / count  # per molecule, in atom order: relabelling-exact
    order = _lexsort_molecules(cp)  # canonical position -> predicted molecule
    cp = torch.gather(cp, 1, order[..., None].expand(-1, -1, 3))
    atoms_p = torch.gather(atoms_p, 1, order[..., None, None].expand_as(atoms_p))
    centre_t, centre_p = ct.mean(1, keepdim=True), cp.mean(1, keepdim=True)  # [B, 1, 3]
    ct, cp = ct - centre_t, cp - centre_p
    atoms_t, atoms_p = (atoms_t - centre_t[:, :, None]) * mask, (atoms_p - centre_p[:, :, None]) * mask
    # Starts: the identity and the inversion (a prediction is usually in the frame of the truth already), then the
    # 48 ways to put the predicted principal axes of the centroid cloud on the true ones.
    axes_t = torch.linalg.eigh(ct.transpose(1, 2) @ ct).eigenvectors  # [B, 3, 3] columns
    axes_p = torch.linalg.eigh(cp.transpose(1, 2) @ cp).eigenvectors
    signed = _signed_permutation_matrices().to(ct.device)
    starts = axes_t[:, None] @ signed[None] @ axes_p[:, None].transpose(-1, -2)  # [B, 48, 3, 3]
    eye = torch.eye(3, dtype=ct.dtype, device=ct.device)
    starts = torch.cat([torch.stack([eye, -eye]).expand(num_clusters, -1, -1, -1), starts], 1)
    dt, dp = _cdist(ct, ct), _cdist(cp, cp)
    # 1. Centroids: superposition + Hungarian, the best results refined by pair exchanges on PM-center.
    cluster, perm, _, rot = _alternate_assignment(ct[:, :, None, :, None] * cp[:, None, :, None, :], starts,
                                                  max_iterations)
    rows, cluster, perm, f = _best_per_cluster(cluster, perm, _pm_center_sums(dt, dp, cluster, perm),
                                               MATCH_REFINED)
    rot = rot[rows]
    refined, f = _swap_descent(dt[cluster], dp[cluster], perm, max_rounds=m * m)
    found = [_best_per_cluster(cluster, refined, f, per_search)[1:]]
    # 2. All atoms (positions and orientations), started from the superpositions of the best centroid results.
    starts = rot[_slots(cluster, num_clusters, MATCH_REFINED)].transpose(0, 1)  # [B, MATCH_REFINED, 3, 3]
    cluster, perm, score, _ = _alternate_assignment(torch.einsum("bipx,bjpy->bijxy", atoms_t, atoms_p), starts,
                                                    max_iterations)
    _, cluster, perm, _ = _best_per_cluster(cluster, perm, score, per_search)
    found.append((cluster, perm, _pm_center_sums(dt, dp, cluster, perm)))
    num = 2 * per_search
    _, cluster, perm, f = _best_per_cluster(*(torch.cat(x) for x in zip(*found)), num)
    pick = _slots(cluster, num_clusters, num)  # [C, B]
    perm, f = perm[pick], f[pick]  # [C, B, M], [C, B] canonical labels
    original = torch.gather(order[None].expand(num, -1, -1), 2, perm)  # -> the caller's labels
    return original, (f / m ** 2).sqrt()


def _invariant_candidates(true, pred, molecule_index, batch):
    """(candidates [C, B, M], paired PackingMatching of each candidate, stacked [C, B])."""
    layout = _molecule_layout(batch, molecule_index)
    candidates, _ = _candidate_permutations(true, pred, layout)
    pm_atom = torch.empty(candidates.shape[:2], dtype=torch.float64, device=true.device)
    pm_center = torch.empty_like(pm_atom)
    for c, perm in enumerate(candidates):
        # Only clusters whose candidate c is new (a cluster with fewer distinct candidates repeats its best).
        new = ~(candidates[:c] == perm).all(-1).any(0) if c else torch.ones_like(perm[:, 0], dtype=torch.bool)
        pm_atom[c], pm_center[c] = float("inf"), float("inf")
        if not new.any():
            continue
        atoms = new[batch]
        local = torch.cumsum(new, 0)[batch[atoms]] - 1
        moved = _permute(pred, layout, perm)[atoms]
        pm = _paired_packing_matching(true[atoms], moved, molecule_index[atoms], local)
        pm_atom[c, new], pm_center[c, new] = pm.pm_atom, pm.pm_center
    return candidates, PackingMatching(pm_atom, pm_center)


@_accepts_arrays
@torch.no_grad()
def match_molecules(true_positions: torch.Tensor, pred_positions: torch.Tensor, molecule_index: torch.Tensor,
                    batch: torch.Tensor | None = None, criterion: str = "pm_center") -> torch.Tensor:
    """Relabel predicted molecules to the true ones: permutation [B, M], ``perm[b, i]`` = the predicted molecule
    of cluster b that plays true molecule i (``permute_molecules`` applies it).

    All molecules are identical copies with a shared atom order, so a matching permutes whole molecules. The best
    permutation for PM (distance matrices, no alignment) is a quadratic assignment problem; it is approximated per
    cluster by (docs/MATH.md §5):

    1. centre both clusters at their centroid of centroids;
    2. from 50 start orientations (the 48 signed permutations that map the principal axes of the predicted
       centroid cloud onto the true ones, proper and mirrored since PM cannot tell mirror images apart, plus the
       identity and the inversion) alternate a Hungarian assignment (``scipy.optimize.linear_sum_assignment``)
       on squared distances after superposition with a Kabsch rotation of the matched molecules until the
       assignment repeats, on molecule centroids;
    3. refine the 8 best results (by PM-center) by exchanging the partners of two molecules while PM-center
       decreases, and keep the best;
    4. repeat step 2 on all atoms (which also sees orientations), started from the superpositions of those 8
       results, and keep the assignment of least superposed atom distance;
    5. of these two candidates, return the one of lower ``criterion`` ("pm_center" or "pm_atom"), computed as
       ``compute_packing_matching`` does.

    The searches see the predicted molecules in a canonical order (sorted centroids), so relabelling them gives
    the same matching. A prediction that is the truth relabelled (and moved rigidly, or mirrored) is matched
    exactly. Cost on one CPU thread, clusters of 17 molecules of ~40 atoms: ~4 ms per cluster for the search
    (Python loops over clusters × starts for the 17×17 Hungarian steps, none over atoms), plus the exact PM of
    the two candidates for "pm_atom" and in ``compute_packing_matching(permutation_invariant=True)`` (~13 ms
    per cluster in all, 3× the index-paired metric).

    Args:
        true_positions, pred_positions: [N, 3] Å, same atom order (molecules of the same size within a cluster).
        molecule_index: [N] molecule of each atom within its cluster (0..M-1).
        batch: [N] cluster of each atom (sorted), or None for a single cluster.
        criterion: "pm_center" or "pm_atom".
    Returns:
        [B, M] int64 permutation per cluster.
    """
    if criterion not in MATCH_CRITERIA:
        raise ValueError(f"criterion must be one of {MATCH_CRITERIA}, got {criterion!r}")
    batch, molecule_index = _validate(true_positions, pred_positions, molecule_index, batch)
    true, pred = true_positions.double(), pred_positions.double()
    if criterion == "pm_center":  # candidates come sorted by PM-center (from the centroid distance matrices)
        return _candidate_permutations(true, pred, _molecule_layout(batch, molecule_index))[0][0]
    candidates, pm = _invariant_candidates(true, pred, molecule_index, batch)
    best = pm.pm_atom.argmin(0)  # [B]; ties: the earlier candidate (lower PM-center)
    return candidates[best, torch.arange(candidates.shape[1], device=best.device)]


@_accepts_arrays
@torch.no_grad()
def permute_molecules(positions: torch.Tensor, molecule_index: torch.Tensor, permutation: torch.Tensor,
                      batch: torch.Tensor | None = None) -> torch.Tensor:
    """Relabel molecules: molecule i of cluster b takes the atoms of molecule ``permutation[b, i]`` (atom k of a
    molecule goes to atom k of its new label). positions [N, 3], permutation [B, M] (or [M] for one cluster);
    returns [N, 3] in the order of ``positions``. Molecules of a cluster must have the same atom count."""
    batch, molecule_index = _validate(positions, None, molecule_index, batch)
    layout = _molecule_layout(batch, molecule_index)
    permutation = _as_tensor("permutation", permutation)
    if permutation.is_floating_point():
        raise ValueError(f"permutation must hold integers, got {permutation.dtype}")
    permutation = permutation.long().to(positions.device)
    if permutation.dim() == 1:
        permutation = permutation[None]
    shape = (layout.num_clusters, layout.num_molecules)
    if permutation.shape != shape:
        raise ValueError(f"permutation must be [B, M]={list(shape)}, got {tuple(permutation.shape)}")
    if (permutation.sort(1).values != torch.arange(shape[1], device=permutation.device)).any():
        raise ValueError("permutation: every row must hold each molecule 0..M-1 exactly once")
    return _permute(positions, layout, permutation)


def aggregate_min_over_repeats(values: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """[R, B] metric per repeat and cluster -> (mean, std over clusters of the per-cluster minimum, min [B])."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.dim() == 1:
        values = values[None]
    if values.dim() != 2 or values.numel() == 0:
        raise ValueError(f"values must be [R, B] with R, B > 0, got {tuple(values.shape)}")
    best = values.min(0).values
    std = best.std(unbiased=False).item() if best.numel() > 1 else 0.0
    return best.mean().item(), std, best


# ----------------------------------------------------------------------------------------------- contacts
def _radii(z: torch.Tensor, kind: str) -> torch.Tensor:
    from ase.data import covalent_radii, vdw_radii

    table = torch.as_tensor(np.nan_to_num(covalent_radii if kind == "covalent" else vdw_radii, nan=2.0),
                            dtype=torch.float64, device=z.device)
    return table[z]


def _intermolecular_closest(d: _Dense, positions: torch.Tensor, radius_kind: str):
    """Per cluster, pairwise intermolecular geometry reduced per molecule pair and per atom pair.

    Yields per chunk: (slice, dist − radius-sum [b, A, A] with +inf on excluded pairs, intermolecular mask)."""
    num_clusters, max_atoms = positions.shape[:2]
    radii = _radii(d.z, radius_kind)  # [B, A]
    for s, e, _, _, _ in _cluster_chunks([max_atoms] * num_clusters, CONTACT_CHUNK_ELEMENTS):
        m, mol = d.mask[s:e], d.mol[s:e]
        inter = m[:, :, None] & m[:, None, :] & (mol[:, :, None] != mol[:, None, :])
        gap = _cdist(positions[s:e], positions[s:e]) - (radii[s:e, :, None] + radii[s:e, None, :])
        yield s, e, gap.masked_fill(~inter, float("inf")), inter


@_accepts_arrays
@torch.no_grad()
def collision_rate(positions: torch.Tensor, molecule_index: torch.Tensor, atomic_numbers: torch.Tensor,
                   batch: torch.Tensor | None = None, tolerance: float = 1.0) -> torch.Tensor:
    """Percentage of intermolecular atom pairs closer than ``tolerance`` × (sum of covalent radii), per cluster.

    Each unordered pair of atoms in different molecules of the same cluster counts once. In a real molecular
    crystal this is 0 (intermolecular contacts are van der Waals, far longer than covalent bonds).
    Returns [B] in %.
    """
    if atomic_numbers is None:
        raise ValueError("collision_rate needs atomic_numbers for the covalent radii")
    d = _densify(positions.double(), None, molecule_index, batch, atomic_numbers)
    out = torch.empty(d.true.shape[0], dtype=torch.float64, device=d.true.device)
    radii = _radii(d.z, "covalent")
    num_clusters, max_atoms = d.true.shape[:2]
    for s, e, _, _, _ in _cluster_chunks([max_atoms] * num_clusters, CONTACT_CHUNK_ELEMENTS):
        m, mol = d.mask[s:e], d.mol[s:e]
        inter = m[:, :, None] & m[:, None, :] & (mol[:, :, None] != mol[:, None, :])
        limit = tolerance * (radii[s:e, :, None] + radii[s:e, None, :])
        clash = (_cdist(d.true[s:e], d.true[s:e]) < limit) & inter
        out[s:e] = 100.0 * clash.sum((1, 2)) / inter.sum((1, 2)).clamp_min(1)
    return out


@_accepts_arrays
@torch.no_grad()
def separation_rate(positions: torch.Tensor, molecule_index: torch.Tensor, atomic_numbers: torch.Tensor,
                    batch: torch.Tensor | None = None, margin: float = 0.5) -> torch.Tensor:
    """Percentage of molecules that touch no other molecule, per cluster.

    A molecule is *separated* when, for every atom pair between it and any other molecule, the distance exceeds
    the sum of the two atoms' van der Waals radii by more than ``margin`` Å (default 0.5 Å): it floats free of the
    packing instead of being in van der Waals contact. (Counting molecule pairs whose closest atoms are more than
    0.5 Å apart would count nearly every pair in any cluster; the gap beyond contact distance is the meaningful
    reading, see docs/MATH.md.) In a crystal cluster this is 0. Returns [B] in %.
    """
    if atomic_numbers is None:
        raise ValueError("separation_rate needs atomic_numbers for the van der Waals radii")
    d = _densify(positions.double(), None, molecule_index, batch, atomic_numbers)
    num_clusters, m_count = d.true.shape[0], d.num_molecules
    out = torch.empty(num_clusters, dtype=torch.float64, device=d.true.device)
    onehot = (d.mol[..., None] == torch.arange(m_count, device=d.mol.device))  # [B, A, M]
    for s, e, gap, _ in _intermolecular_closest(d, d.true, "vdw"):
        # closest gap of each atom to any atom of another molecule, then min over the molecule's atoms
        atom_gap = gap.min(-1).values  # [b, A]
        mol_gap = atom_gap[..., None].expand(-1, -1, m_count).masked_fill(~onehot[s:e], float("inf")).min(1).values
        out[s:e] = 100.0 * (mol_gap > margin).double().mean(-1)
    return out


# ---------------------------------------------------------------------------------------------------- RMSD_15
@_accepts_arrays
@torch.no_grad()
def rmsd15(true_positions: torch.Tensor, pred_positions: torch.Tensor, molecule_index: torch.Tensor,
           atomic_numbers: torch.Tensor, batch: torch.Tensor | None = None, num_molecules: int = 15) -> torch.Tensor:
    """COMPACK-like RMSD of the central molecule and its 14 nearest neighbours (non-hydrogen atoms), per cluster.

    1. In the true cluster take molecule 0 and its ``num_molecules − 1`` nearest molecules by centroid distance.
    2. Superpose the predicted cluster on the true one using the central molecule's heavy atoms (Kabsch): the
       central molecule is defined in both, so this frame does not depend on how the others are labelled.
    3. Match each selected true molecule to a distinct predicted molecule by the Hungarian algorithm on centroid
       distances in that frame (predictions may place molecule j where molecule i belongs; all copies are the same
       molecule, so atom order within a molecule is shared).
    4. Kabsch-superpose the matched heavy atoms of all selected molecules and report their RMSD in Å.
    Returns [B] Å, float64.
    """
    from scipy.optimize import linear_sum_assignment

    d = _densify(true_positions.double(), pred_positions.double(), molecule_index, batch, atomic_numbers)
    num_clusters, num_mol = d.true.shape[0], d.num_molecules
    k = min(num_molecules, num_mol)
    heavy = d.mask & (d.z > 1)
    # Per-molecule atom tensors [B, M, P, 3]: atoms of each molecule in their original order.
    onehot = d.mol[..., None] == torch.arange(num_mol, device=d.mol.device)  # [B, A, M]
    per_mol = onehot.sum(1)  # [B, M]
    if (per_mol != per_mol[:, :1]).any():
        raise ValueError("rmsd15 expects identical molecules (same atom count for every molecule in a cluster)")
    p = int(per_mol[0, 0])
    order = torch.argsort((~onehot).transpose(1, 2).to(torch.int8), dim=-1, stable=True)[..., :p]  # [B, M, P]
    gather = lambda x: torch.gather(x[:, None].expand(-1, num_mol, -1, *x.shape[2:]), 2,  # noqa: E731
                                    order.reshape(*order.shape, *([1] * (x.dim() - 2))).expand(
                                        -1, -1, -1, *x.shape[2:]))
    true_m, pred_m, heavy_m = gather(d.true), gather(d.pred), gather(heavy.double())  # [B, M, P, (3)]

    ct = d.true_centroids  # [B, M, 3]
    nearest = torch.argsort((ct - ct[:, :1]).norm(dim=-1), dim=-1)[:, :k]  # [B, k], includes 0 first
    rot, shift = kabsch(pred_m[:, 0], true_m[:, 0], heavy_m[:, 0])
    pred_aligned = torch.einsum("bij,bmpj->bmpi", rot, pred_m) + shift[:, None, None]
    cp = (pred_aligned * heavy_m[..., None]).sum(2) / heavy_m.sum(2)[..., None].clamp_min(1)  # [B, M, 3]
    ct_heavy = (true_m * heavy_m[..., None]).sum(2) / heavy_m.sum(2)[..., None].clamp_min(1)
    sel_true = torch.gather(ct_heavy, 1, nearest[..., None].expand(-1, -1, 3))  # [B, k, 3]
    cost = torch.cdist(sel_true, cp).cpu().numpy()  # [B, k, M]
    matched = np.empty((num_clusters, k), dtype=np.int64)
    for b in range(num_clusters):
        rows, cols = linear_sum_assignment(cost[b])
        matched[b, rows] = cols
    matched = torch.as_tensor(matched, device=d.true.device)
    idx = lambda x, sel: torch.gather(x, 1, sel.reshape(*sel.shape, *([1] * (x.dim() - 2))).expand(  # noqa: E731
        -1, -1, *x.shape[2:]))
    tgt = idx(true_m, nearest).reshape(num_clusters, k * p, 3)
    mob = idx(pred_m, matched).reshape(num_clusters, k * p, 3)
    w = idx(heavy_m, nearest).reshape(num_clusters, k * p)
    rot, shift = kabsch(mob, tgt, w)
    moved = torch.einsum("bij,bpj->bpi", rot, mob) + shift[:, None]
    return (((moved - tgt).pow(2).sum(-1) * w).sum(-1) / w.sum(-1).clamp_min(1)).sqrt()
