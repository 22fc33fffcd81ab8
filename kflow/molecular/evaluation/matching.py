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
import itertools
from typing import NamedTuple

import numpy as np
import torch

from kflow.molecular.evaluation.dense import (PAIR_CHUNK_ELEMENTS, accepts_arrays, as_tensor, cdist, check_molecules,
                                              cluster_chunks, gram_distances, to_dense, validate)
from kflow.molecular.geometry import index_centroids, pad_by_index


__all__ = ["PackingMatching", "compute_packing_matching", "match_molecules", "permute_molecules",
           "aggregate_min_over_repeats", "MATCH_CRITERIA", "MATCH_CANDIDATES_PER_SEARCH", "MATCH_REFINED",
           "MATCH_MAX_ITERATIONS"]


class PackingMatching(NamedTuple):
    pm_atom: torch.Tensor  # [B] Å
    pm_center: torch.Tensor  # [B] Å


# ------------------------------------------------------------------------------------------------ packing matching
@accepts_arrays
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
    batch, molecule_index = validate(true_positions, pred_positions, molecule_index, batch)
    true, pred = true_positions.double(), pred_positions.double()
    if not permutation_invariant:
        return _paired_packing_matching(true, pred, molecule_index, batch)
    _, pm = _invariant_candidates(true, pred, molecule_index, batch)
    return PackingMatching(pm.pm_atom.min(0).values, pm.pm_center.min(0).values)


def _paired_packing_matching(true, pred, molecule_index, batch) -> PackingMatching:
    """Index-paired PM-atom and PM-center of validated float64 inputs."""
    num_clusters = int(batch.max()) + 1
    num_molecules = check_molecules(batch, molecule_index, num_clusters)
    pm_atom = torch.empty(num_clusters, dtype=torch.float64, device=true.device)
    for s, e, lo, hi, _ in cluster_chunks(torch.bincount(batch).tolist(), PAIR_CHUNK_ELEMENTS):
        local = batch[lo:hi] - s
        t, mask = to_dense(true[lo:hi], local, e - s)
        p, _ = to_dense(pred[lo:hi], local, e - s)
        diff = gram_distances(t, mask)
        diff -= gram_distances(p, mask)  # [b, A, A], zero on padding
        count = mask.sum(1).double()
        pm_atom[s:e] = torch.linalg.vector_norm(diff, dim=(1, 2)) / count
    key, num_groups = batch * num_molecules + molecule_index, num_clusters * num_molecules
    ct = index_centroids(true, key, num_groups).reshape(num_clusters, num_molecules, 3)
    cp = index_centroids(pred, key, num_groups).reshape(num_clusters, num_molecules, 3)
    pm_center = (cdist(ct, ct) - cdist(cp, cp)).pow(2).mean((1, 2)).sqrt()
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
    num_molecules = check_molecules(batch, molecule_index, num_clusters)
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
    dt, dp = cdist(ct, ct), cdist(cp, cp)
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


@accepts_arrays
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
    batch, molecule_index = validate(true_positions, pred_positions, molecule_index, batch)
    true, pred = true_positions.double(), pred_positions.double()
    if criterion == "pm_center":  # candidates come sorted by PM-center (from the centroid distance matrices)
        return _candidate_permutations(true, pred, _molecule_layout(batch, molecule_index))[0][0]
    candidates, pm = _invariant_candidates(true, pred, molecule_index, batch)
    best = pm.pm_atom.argmin(0)  # [B]; ties: the earlier candidate (lower PM-center)
    return candidates[best, torch.arange(candidates.shape[1], device=best.device)]


@accepts_arrays
@torch.no_grad()
def permute_molecules(positions: torch.Tensor, molecule_index: torch.Tensor, permutation: torch.Tensor,
                      batch: torch.Tensor | None = None) -> torch.Tensor:
    """Relabel molecules: molecule i of cluster b takes the atoms of molecule ``permutation[b, i]`` (atom k of a
    molecule goes to atom k of its new label). positions [N, 3], permutation [B, M] (or [M] for one cluster);
    returns [N, 3] in the order of ``positions``. Molecules of a cluster must have the same atom count."""
    batch, molecule_index = validate(positions, None, molecule_index, batch)
    layout = _molecule_layout(batch, molecule_index)
    permutation = as_tensor("permutation", permutation)
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
