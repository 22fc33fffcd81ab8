"""What every assembly metric shares: argument checks (torch tensors, numpy arrays or nested lists in, the same
kind out) and padded [B, N_max, ...] tensors processed in chunks of clusters.
"""
from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import numpy as np
import torch

from kflow.molecular.geometry import index_centroids, pad_by_index


__all__ = ["PAIR_CHUNK_ELEMENTS", "CONTACT_CHUNK_ELEMENTS", "Dense", "accepts_arrays", "as_tensor", "cdist",
           "check_molecules", "cluster_chunks", "densify", "gram_distances", "to_dense", "validate"]


PAIR_CHUNK_ELEMENTS = 1_000_000  # [chunk, A, A] pair tensors of ~1M elements stay in cache: several times faster
CONTACT_CHUNK_ELEMENTS = 8_000_000  # contact metrics keep several such tensors alive at once


# ----------------------------------------------------------------------------------------------------- validation
_INDEX_ARGUMENTS = ("molecule_index", "batch", "atomic_numbers")


def as_tensor(name: str, value):
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


def accepts_arrays(metric):
    """Let ``metric`` take numpy arrays and lists; its tensors come back as numpy arrays when the inputs were."""
    signature = inspect.signature(metric)

    @functools.wraps(metric)
    def wrapper(*args, **kwargs):
        bound = dict(signature.bind(*args, **kwargs).arguments)
        from_numpy = any(v is not None and not torch.is_tensor(v) for k, v in bound.items()
                         if k.endswith("positions") or k in _INDEX_ARGUMENTS)
        bound = {k: as_tensor(k, v) if (k.endswith("positions") or k in _INDEX_ARGUMENTS) else v
                 for k, v in bound.items()}
        out = metric(**bound)
        if not from_numpy:
            return out
        if isinstance(out, tuple):
            return type(out)(*(x.cpu().numpy() for x in out))
        return out.cpu().numpy()

    return wrapper


def validate(true_positions, pred_positions, molecule_index, batch, atomic_numbers=None):
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


def to_dense(x, batch, num_clusters, fill=0.0):
    """[N, ...] concatenated -> [B, N_max, ...] padded, and the [B, N_max] mask."""
    dense, mask, _ = pad_by_index(x, batch, num_clusters, fill)
    return dense, mask


class Dense(NamedTuple):
    true: torch.Tensor  # [B, A, 3]
    pred: torch.Tensor | None  # [B, A, 3]
    mol: torch.Tensor  # [B, A] molecule id (-1 = padding)
    mask: torch.Tensor  # [B, A]
    z: torch.Tensor | None  # [B, A] atomic numbers (0 = padding)
    num_molecules: int
    true_centroids: torch.Tensor  # [B, M, 3] unweighted centroids of the true molecules


def densify(true_positions, pred_positions, molecule_index, batch, atomic_numbers=None) -> Dense:
    batch, molecule_index = validate(true_positions, pred_positions, molecule_index, batch, atomic_numbers)
    num_clusters = int(batch.max()) + 1
    true, mask = to_dense(true_positions, batch, num_clusters)
    pred = to_dense(pred_positions, batch, num_clusters)[0] if pred_positions is not None else None
    mol = to_dense(molecule_index, batch, num_clusters, fill=-1)[0]
    z = to_dense(atomic_numbers.long(), batch, num_clusters)[0] if atomic_numbers is not None else None
    num_molecules = check_molecules(batch, molecule_index, num_clusters)
    centroids = index_centroids(true_positions.double(), batch * num_molecules + molecule_index,
                                num_clusters * num_molecules).reshape(num_clusters, num_molecules, 3)
    return Dense(true, pred, mol, mask, z, num_molecules, centroids)


def cdist(a, b):
    """Exact pairwise distances (the matmul shortcut of cdist loses ~1e-8 Å near zero distance)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def gram_distances(pos, mask):
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


def cluster_chunks(counts: list[int], budget: int):
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


def check_molecules(batch, molecule_index, num_clusters) -> int:
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
