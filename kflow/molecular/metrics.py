"""Assembly metrics: packing matching (AssembleFlow-compatible), collisions, separation, COMPACK-like RMSD_15.

Inputs follow the PyG convention: atoms of several clusters concatenated, with ``batch`` [N] giving each atom's
cluster and ``molecule_index`` [N] the molecule within its cluster (0 = central molecule). A single cluster may be
passed without ``batch``. Every metric takes torch tensors, numpy arrays or nested lists; called with numpy arrays
or lists it returns numpy arrays, with tensors it returns tensors. Everything is computed on padded [B, N_max, ...] tensors in chunks of clusters, so no
Python loop runs over atoms (the Hungarian step of RMSD_15 loops over clusters; it is a 15×17 assignment).
"""
from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import numpy as np
import torch

from kflow.molecular.geometry import index_centroids, kabsch, pad_by_index

__all__ = [
    "PackingMatching",
    "compute_packing_matching",
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
                             molecule_index: torch.Tensor, batch: torch.Tensor | None = None) -> PackingMatching:
    """Packing matching of predicted vs true clusters, as AssembleFlow defines it.

    PM-atom = sqrt(mean_{i,j} (D_true[i, j] − D_pred[i, j])²) over the full N×N all-atom distance matrix of a
    cluster (hydrogens included, diagonal included, no alignment: distances are invariant anyway). PM-center is
    the same on the M×M matrix of molecule centroids (unweighted mean of each molecule's atoms).

    Args:
        true_positions, pred_positions: [N, 3] Å, atoms of one or several clusters (same atom order).
        molecule_index: [N] molecule of each atom within its cluster (0..M-1).
        batch: [N] cluster of each atom (sorted), or None for a single cluster.
    Returns:
        PackingMatching(pm_atom [B], pm_center [B]) in Å, float64.
    """
    batch, molecule_index = _validate(true_positions, pred_positions, molecule_index, batch)
    true, pred = true_positions.double(), pred_positions.double()
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
