"""K-amplitude decompositions: linear, orthonormal, exactly invertible maps with a band label per coefficient.

Every decomposition acts on the trailing data dimensions of its input and broadcasts over all leading dimensions
(batch, channels, ...). ``band_index`` is a LongTensor with the shape of the coefficients of those trailing
dimensions; band 0 is the lowest scale (most energy), band ``num_bands - 1`` the highest.

Orthonormality matters: white Gaussian noise stays white in coefficient space, so "noise padding" of bands that
the flow has not reached yet has the same statistics whichever decomposition is used. The band definitions of
each decomposition are written out in docs/MATH.md §3.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
from torch import nn

__all__ = [
    "Decomposition",
    "IdentityDecomposition",
    "FourierDecomposition",
    "WaveletDecomposition",
    "PCADecomposition",
    "LaplacianDecomposition",
    "group_into_bands",
]


def group_into_bands(values: torch.Tensor, num_bands: int, mode: str = "equal_count") -> torch.Tensor:
    """Assign each entry of a 1-D tensor of scale values (ascending = lower band) to one of ``num_bands`` bands.

    mode:
        "equal_count": sort by value, split into ``num_bands`` contiguous groups of (nearly) equal size; ties are
            kept in one band so that coefficients of the same scale never straddle a band edge.
        "equal_width": equal-width bins over [min, max] of the values.
    Returns a LongTensor of the same shape with band labels in [0, num_bands).
    """
    if num_bands < 1:
        raise ValueError(f"num_bands must be >= 1, got {num_bands}")
    flat = values.reshape(-1).to(torch.float64)
    n = flat.numel()
    if num_bands > n:
        raise ValueError(f"num_bands={num_bands} exceeds the number of coefficients ({n})")
    if num_bands == 1:
        return torch.zeros_like(flat, dtype=torch.long).reshape(values.shape)
    if mode == "equal_width":
        lo, hi = flat.min(), flat.max()
        edges = lo + (hi - lo) * torch.arange(1, num_bands, dtype=torch.float64) / num_bands
        bands = torch.bucketize(flat, edges, right=True)
    elif mode == "equal_count":
        order = torch.argsort(flat, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n)
        bands = (rank * num_bands) // n
        # Coefficients with the same scale value (e.g. a radial shell) must share a band: give ties the lowest band.
        uniq, inverse = torch.unique(flat, return_inverse=True)
        lowest = torch.full((uniq.numel(),), num_bands, dtype=torch.long).scatter_reduce(
            0, inverse, bands, reduce="amin")
        bands = lowest[inverse]
    else:
        raise ValueError(f"unknown band grouping mode {mode!r}; use 'equal_count' or 'equal_width'")
    return bands.reshape(values.shape)


class Decomposition(nn.Module):
    """Base class. Subclasses set ``data_shape``, ``coeff_shape`` and the buffer ``band_index``."""

    data_shape: tuple[int, ...]
    coeff_shape: tuple[int, ...]
    band_index: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., *data_shape] -> [..., *coeff_shape]
        raise NotImplementedError

    def inverse(self, coeffs: torch.Tensor) -> torch.Tensor:  # [..., *coeff_shape] -> [..., *data_shape]
        raise NotImplementedError

    @property
    def num_bands(self) -> int:
        return int(self._num_bands)

    def band_sizes(self) -> torch.Tensor:
        """Number of coefficients in each band, [K]."""
        return torch.bincount(self.band_index.reshape(-1), minlength=self.num_bands)

    def band_mask(self, bands: int | Sequence[int]) -> torch.Tensor:
        """Boolean mask of ``coeff_shape`` selecting the coefficients of the given band(s)."""
        bands = torch.as_tensor([bands] if isinstance(bands, int) else list(bands), dtype=torch.long)
        if bands.numel() and (bands.min() < 0 or bands.max() >= self.num_bands):
            raise ValueError(f"band ids {bands.tolist()} out of range for {self.num_bands} bands")
        return torch.isin(self.band_index, bands.to(self.band_index.device))

    def band_energies(self, x: torch.Tensor) -> torch.Tensor:
        """Energy (sum of squared coefficients) per band: [..., *data_shape] -> [..., K].

        Leading dimensions beyond the batch (e.g. channels) are summed into the band energy.
        """
        c = self.forward(x)
        nd = len(self.coeff_shape)
        c2 = c.pow(2)
        band = self.band_index.expand(self.coeff_shape).reshape(-1)
        c2 = c2.reshape(*c2.shape[: c2.dim() - nd], -1)  # [..., D]
        out = c2.new_zeros(*c2.shape[:-1], self.num_bands)
        return out.index_add_(-1, band.to(c2.device), c2)

    def _check_trailing(self, x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        if tuple(x.shape[x.dim() - len(shape):]) != tuple(shape) or x.dim() < len(shape):
            raise ValueError(f"{type(self).__name__}: expected {what} with trailing shape {tuple(shape)}, "
                             f"got {tuple(x.shape)}")


class IdentityDecomposition(Decomposition):
    """The trivial one-band decomposition: coefficients are the data. With K=1 this is rectified flow."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.data_shape = self.coeff_shape = tuple(int(s) for s in shape)
        self._num_bands = 1
        self.register_buffer("band_index", torch.zeros(self.data_shape, dtype=torch.long), persistent=False)

    def forward(self, x):
        self._check_trailing(x, self.data_shape, "data")
        return x

    def inverse(self, coeffs):
        self._check_trailing(coeffs, self.coeff_shape, "coefficients")
        return coeffs


class FourierDecomposition(Decomposition):
    """Real orthonormal Fourier transform over the last 1, 2 or 3 axes, banded by radial frequency.

    The unitary DFT X = FFT(x) of a real signal is Hermitian: X[-k] = conj(X[k]). Each pair {k, -k} carries two
    real degrees of freedom, stored as sqrt(2)·Re X[k] at the pair's representative k (the smaller flat index) and
    sqrt(2)·Im X[k] at its partner -k; self-conjugate frequencies (k = -k) store Re X[k]. The coefficients have
    the same shape as the signal and the map is orthogonal, so noise stays white and energy is preserved.

    Args:
        shape: spatial shape (1–3 ints), e.g. (32, 32). Leading dims (batch, channels) broadcast.
        num_bands: number of radial-frequency bands K.
        grouping: "equal_width" (equal radial bins, default) or "equal_count" (equal number of coefficients).
    """

    def __init__(self, shape: Sequence[int], num_bands: int, grouping: str = "equal_width"):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if not 1 <= len(shape) <= 3 or min(shape) < 1:
            raise ValueError(f"FourierDecomposition supports 1-, 2- or 3-D signals, got shape {shape}")
        self.data_shape = self.coeff_shape = shape
        self._num_bands = int(num_bands)
        self.dims = tuple(range(-len(shape), 0))

        grids = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
        flat_index = torch.arange(math.prod(shape)).reshape(shape)
        neg = [(-g) % n for g, n in zip(grids, shape)]
        conj_index = flat_index[tuple(neg)]  # flat index of -k for every k
        is_self = conj_index == flat_index
        is_rep = flat_index < conj_index
        freqs = [torch.fft.fftfreq(n, dtype=torch.float64)[g] for g, n in zip(grids, shape)]
        radius = torch.sqrt(sum(f ** 2 for f in freqs))

        self.register_buffer("band_index", group_into_bands(radius, num_bands, grouping), persistent=False)
        self.register_buffer("radius", radius, persistent=False)
        self.register_buffer("conj_index", conj_index.reshape(-1), persistent=False)
        self.register_buffer("is_self", is_self, persistent=False)
        self.register_buffer("is_rep", is_rep, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_trailing(x, self.data_shape, "data")
        X = torch.fft.fftn(x, dim=self.dims, norm="ortho")
        root2 = math.sqrt(2.0)
        return torch.where(self.is_self, X.real, torch.where(self.is_rep, root2 * X.real, -root2 * X.imag))

    def inverse(self, coeffs: torch.Tensor) -> torch.Tensor:
        self._check_trailing(coeffs, self.coeff_shape, "coefficients")
        nd = len(self.data_shape)
        flat = coeffs.reshape(*coeffs.shape[: coeffs.dim() - nd], -1)
        partner = flat[..., self.conj_index].reshape(coeffs.shape)  # c[-k] for every k
        inv_root2 = 1.0 / math.sqrt(2.0)
        re = torch.where(self.is_self, coeffs, torch.where(self.is_rep, coeffs, partner) * inv_root2)
        im = torch.where(self.is_self, torch.zeros_like(coeffs),
                         torch.where(self.is_rep, partner, -coeffs) * inv_root2)
        return torch.fft.ifftn(torch.complex(re, im), dim=self.dims, norm="ortho").real


class WaveletDecomposition(Decomposition):
    """Orthogonal multi-level 2-D DWT with boundary wavelets (ptwt's matrix transform), band = level.

    ptwt's ``MatrixWavedec2`` builds the orthogonal analysis operator with boundary filters, so the transform is
    size-preserving and exactly invertible. We materialise that operator once as a dense [H·W, H·W] matrix (by
    transforming the canonical basis) because a dense matmul on 32×32 latents is much faster than ptwt's sparse
    path. Coefficients are a flat vector [H·W] ordered approximation, then details from coarsest to finest level.

    Note: ptwt orthogonalises the boundary filters (QR), which costs them their vanishing moments; on small grids
    part of the energy of a smooth image then sits in the boundary detail coefficients (for db6 on 32×32 a
    constant image keeps only ~47% in the approximation band; haar keeps 100%, db6 on 64×64 ~71%).

    Bands: the approximation is level 0, details of the coarsest level are level 1, ..., finest level L. The L+1
    levels are grouped into ``num_bands`` contiguous bands (low levels first).

    Args:
        shape: (H, W) spatial shape. Leading dims broadcast.
        num_bands: K <= level + 1.
        wavelet: pywt wavelet name; "db6" (default) allows 1 level (2 scales) on 32×32, "haar" up to 5.
        level: number of DWT levels; default: the largest ptwt accepts for this size, but at least K - 1.
    """

    def __init__(self, shape: Sequence[int], num_bands: int, wavelet: str = "db6", level: int | None = None):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(f"WaveletDecomposition is 2-D; got shape {shape}")
        self.data_shape, self.coeff_shape = shape, (shape[0] * shape[1],)
        self._num_bands = int(num_bands)
        self.wavelet, self.level = wavelet, level
        matrix, levels = self._build_matrix(shape, wavelet, level, num_bands)
        self.level = int(levels.max())
        # Group the L+1 levels into K contiguous bands.
        band_of_level = (torch.arange(self.level + 1) * num_bands) // (self.level + 1)
        self.register_buffer("band_index", band_of_level[levels], persistent=False)
        self.register_buffer("level_index", levels, persistent=False)
        self.register_buffer("matrix", matrix, persistent=False)  # [D_coeff, D_data], float64, orthogonal

    @staticmethod
    def _build_matrix(shape, wavelet, level, num_bands):
        import warnings

        import ptwt
        import pywt

        if level is None:
            filt = pywt.Wavelet(wavelet).dec_len
            level = max(pywt.dwt_max_level(min(shape), filt), num_bands - 1, 1)
        if level + 1 < num_bands:
            raise ValueError(f"{wavelet} with {level} levels gives {level + 1} scales; cannot form {num_bands} bands")
        h, w = shape
        eye = torch.eye(h * w, dtype=torch.float64).reshape(h * w, h, w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ptwt's sparse-tensor beta warnings
            try:
                coeffs = ptwt.MatrixWavedec2(wavelet, level=level)(eye)
            except Exception as err:  # ptwt raises on sizes too small for the filter at this depth
                raise ValueError(f"wavelet {wavelet!r} with {level} levels is not defined on a {h}x{w} grid "
                                 f"({err}); use fewer levels or a shorter wavelet such as 'haar'") from err
        parts, levels = [coeffs[0].reshape(h * w, -1)], [torch.zeros(coeffs[0][0].numel(), dtype=torch.long)]
        for lvl, details in enumerate(coeffs[1:], start=1):
            for d in details:
                parts.append(d.reshape(h * w, -1))
                levels.append(torch.full((d[0].numel(),), lvl, dtype=torch.long))
        got = len(coeffs) - 1
        if got < level:  # ptwt silently stops early when the filter is longer than the coarser grids
            raise ValueError(f"wavelet {wavelet!r} admits only {got} of the {level} requested levels on a {h}x{w} "
                             f"grid (filter length {pywt.Wavelet(wavelet).dec_len}), so it cannot form {num_bands} "
                             "bands; use a shorter wavelet (e.g. 'db4', 'db2' or 'haar') or a larger grid")
        matrix = torch.cat(parts, dim=1).T.contiguous()  # [D_coeff, D_data]
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"wavelet {wavelet!r} at {level} levels is not size-preserving on {h}x{w} "
                             f"({matrix.shape[0]} coefficients for {h * w} pixels); choose sizes divisible by 2^level")
        gram_err = (matrix @ matrix.T - torch.eye(h * w, dtype=torch.float64)).abs().max().item()
        if gram_err > 1e-8:
            raise ValueError(f"wavelet transform for {wavelet!r} on {h}x{w} is not orthogonal (error {gram_err:.2e})")
        return matrix, torch.cat(levels)

    def _matrix_for(self, x):
        return self.matrix.to(dtype=x.dtype, device=x.device)

    def forward(self, x):
        self._check_trailing(x, self.data_shape, "data")
        flat = x.reshape(*x.shape[:-2], -1)
        return flat @ self._matrix_for(x).T

    def inverse(self, coeffs):
        self._check_trailing(coeffs, self.coeff_shape, "coefficients")
        flat = coeffs @ self._matrix_for(coeffs)
        return flat.reshape(*coeffs.shape[:-1], *self.data_shape)


class PCADecomposition(Decomposition):
    """Data-dependent orthonormal basis: principal components sorted by explained variance, grouped into bands.

    Use ``PCADecomposition.fit(data, num_bands)``; the basis is a buffer, so it is saved with a model's
    ``state_dict`` and via ``save``/``load``. The map is purely linear (no mean subtraction) so that it stays
    orthonormal; the mean only influences which directions count as high-variance.

    With ``patch_size=p`` the data [C, H, W] is cut into non-overlapping p×p patches and one basis over the
    C·p·p patch vector is shared by all patches (cheap for large latents); coefficients are then
    [H/p, W/p, C·p·p]. Without it, the whole flattened sample is one vector and coefficients are [D].
    """

    def __init__(self, data_shape: Sequence[int], basis: torch.Tensor, explained_variance: torch.Tensor,
                 num_bands: int, patch_size: int | None = None, grouping: str = "equal_count"):
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)
        self.patch_size = patch_size
        self.grouping = grouping
        self._num_bands = int(num_bands)
        dim = basis.shape[0]
        if basis.shape != (dim, dim):
            raise ValueError(f"PCA basis must be square, got {tuple(basis.shape)}")
        if patch_size is None:
            if dim != math.prod(self.data_shape):
                raise ValueError(f"basis of size {dim} does not match data shape {self.data_shape}")
            self.coeff_shape = (dim,)
            grid = ()
        else:
            c, h, w = self.data_shape[-3:] if len(self.data_shape) >= 3 else (1, *self.data_shape)
            if h % patch_size or w % patch_size:
                raise ValueError(f"patch_size {patch_size} must divide the spatial shape {(h, w)}")
            if dim != c * patch_size ** 2:
                raise ValueError(f"basis of size {dim} does not match patches of {c}x{patch_size}x{patch_size}")
            grid = (h // patch_size, w // patch_size)
            self.coeff_shape = (*grid, dim)
        self.register_buffer("basis", basis.to(torch.float64))  # [D, D], columns = components
        self.register_buffer("explained_variance", explained_variance.to(torch.float64))  # [D], descending
        band = self._bands_from_variance(self.explained_variance, num_bands, grouping)
        self.register_buffer("band_index", band.expand(*grid, dim).clone(), persistent=False)

    @staticmethod
    def _bands_from_variance(var, num_bands, grouping):
        dim = var.numel()
        if grouping == "equal_count":
            return (torch.arange(dim) * num_bands) // dim
        if grouping == "energy":  # equal shares of cumulative explained variance
            frac = torch.cumsum(var.clamp_min(0), 0) / var.clamp_min(0).sum().clamp_min(1e-300)
            band = torch.clamp((frac * num_bands - 1e-9).floor().long(), 0, num_bands - 1)
            return torch.cummax(band, 0).values
        raise ValueError(f"unknown PCA grouping {grouping!r}; use 'equal_count' or 'energy'")

    @classmethod
    def fit(cls, data: torch.Tensor, num_bands: int, patch_size: int | None = None,
            grouping: str = "equal_count") -> "PCADecomposition":
        """Fit on ``data`` [N, *data_shape] (at least a few hundred samples for a stable high-band basis)."""
        if data.dim() < 2 or data.shape[0] < 2:
            raise ValueError(f"PCA fit needs [N, ...] data with N >= 2, got {tuple(data.shape)}")
        if not torch.isfinite(data).all():
            raise ValueError("PCA fit data contains NaN or inf")
        data_shape = tuple(data.shape[1:])
        x = data.to(torch.float64)
        if patch_size is None:
            vectors = x.reshape(x.shape[0], -1)
        else:
            vectors = cls._to_patches(x if x.dim() >= 4 else x.unsqueeze(1), patch_size).reshape(
                -1, (x.shape[-3] if x.dim() >= 4 else 1) * patch_size ** 2)
        centred = vectors - vectors.mean(0)
        cov = centred.T @ centred / max(vectors.shape[0] - 1, 1)
        var, vec = torch.linalg.eigh(cov)  # ascending
        var, vec = var.flip(0), vec.flip(1)
        # Deterministic signs: the largest-magnitude entry of each component is positive.
        idx = vec.abs().argmax(0)
        sign = torch.sign(vec[idx, torch.arange(vec.shape[1])])
        vec = vec * torch.where(sign == 0, torch.ones_like(sign), sign)
        return cls(data_shape, vec, var, num_bands, patch_size, grouping)

    @staticmethod
    def _to_patches(x, p):  # [..., C, H, W] -> [..., H/p, W/p, C*p*p]
        *lead, c, h, w = x.shape
        x = x.reshape(*lead, c, h // p, p, w // p, p)
        nl = len(lead)
        x = x.permute(*range(nl), nl + 1, nl + 3, nl, nl + 2, nl + 4)
        return x.reshape(*lead, h // p, w // p, c * p * p)

    def _from_patches(self, z):  # [..., H/p, W/p, C*p*p] -> [..., *data_shape]
        p = self.patch_size
        c, h, w = self.data_shape[-3:] if len(self.data_shape) >= 3 else (1, *self.data_shape)
        *lead, gh, gw, _ = z.shape
        z = z.reshape(*lead, gh, gw, c, p, p)
        nl = len(lead)
        z = z.permute(*range(nl), nl + 2, nl, nl + 3, nl + 1, nl + 4).reshape(*lead, c, h, w)
        return z.reshape(*lead, *self.data_shape)

    def forward(self, x):
        self._check_trailing(x, self.data_shape, "data")
        basis = self.basis.to(dtype=x.dtype, device=x.device)
        if self.patch_size is None:
            return x.reshape(*x.shape[: x.dim() - len(self.data_shape)], -1) @ basis
        lead = x.shape[: x.dim() - len(self.data_shape)]
        xs = x.reshape(*lead, *((1,) if len(self.data_shape) == 2 else ()), *self.data_shape)
        return self._to_patches(xs, self.patch_size) @ basis

    def inverse(self, coeffs):
        self._check_trailing(coeffs, self.coeff_shape, "coefficients")
        basis = self.basis.to(dtype=coeffs.dtype, device=coeffs.device)
        z = coeffs @ basis.T
        if self.patch_size is None:
            return z.reshape(*coeffs.shape[:-1], *self.data_shape)
        return self._from_patches(z)

    def save(self, path: str | os.PathLike) -> None:
        from kflow.utils.io import atomic_save

        atomic_save({"kind": "PCADecomposition", "data_shape": self.data_shape, "basis": self.basis,
                     "explained_variance": self.explained_variance, "num_bands": self.num_bands,
                     "patch_size": self.patch_size, "grouping": self.grouping}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PCADecomposition":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise ValueError(f"{path}: not a readable PCA basis file ({err})") from err
        if not isinstance(state, dict) or state.get("kind") != "PCADecomposition":
            raise ValueError(f"{path}: not a kflow PCADecomposition file")
        return cls(state["data_shape"], state["basis"], state["explained_variance"], state["num_bands"],
                   state["patch_size"], state["grouping"])


class LaplacianDecomposition(Decomposition):
    """Graph-Laplacian eigenbasis over M points (molecules), acting along the point axis of [..., M, C] features.

    W_ij = exp(-(d_ij / σ)²) for i ≠ j from pairwise distances d of ``positions``; L = D − W; eigenvectors U sorted
    by ascending eigenvalue (the constant vector, i.e. the whole-cluster mode, first). Coefficients are Uᵀ x, so
    band 0 holds the smoothest (collective) modes and the last band the most local ones. Because W depends only
    on distances, the basis is invariant to rotating/translating the points, and permuting the points permutes
    the rows of U (band projectors U_b U_bᵀ are permutation-equivariant; individual eigenvectors are defined up
    to sign, which the K-Flow interpolant does not see).

    Args:
        positions: [M, 3] or [B, M, 3] point coordinates (e.g. initial molecule centroids).
        num_bands: K <= M.
        sigma: kernel width in the units of ``positions``; default: per-cluster median pairwise distance.
        normalized: use the symmetric normalised Laplacian I − D^-1/2 W D^-1/2 instead.
        band_sizes: explicit number of eigenvectors per band (sums to M); default: equal split, low bands larger.
    """

    def __init__(self, positions: torch.Tensor, num_bands: int, sigma: float | None = None,
                 normalized: bool = False, band_sizes: Sequence[int] | None = None):
        super().__init__()
        if positions.dim() not in (2, 3) or positions.shape[-1] != 3:
            raise ValueError(f"positions must be [M, 3] or [B, M, 3], got {tuple(positions.shape)}")
        if not torch.isfinite(positions).all():
            raise ValueError("LaplacianDecomposition: positions contain NaN or inf")
        m = positions.shape[-2]
        if not 1 <= num_bands <= m:
            raise ValueError(f"num_bands must be in [1, {m}] for {m} points, got {num_bands}")
        self._num_bands = int(num_bands)
        self.data_shape = self.coeff_shape = (m, 1)  # broadcasts over the feature axis C
        pos = positions.to(torch.float64)
        dist = torch.cdist(pos, pos)  # [..., M, M]
        off = ~torch.eye(m, dtype=torch.bool, device=pos.device)
        if sigma is None:
            sig = dist[..., off].median(dim=-1).values.clamp_min(1e-6)  # [...]
        else:
            sig = torch.full(pos.shape[:-2], float(sigma), dtype=torch.float64, device=pos.device)
        weights = torch.exp(-(dist / sig[..., None, None]) ** 2) * off
        degree = weights.sum(-1)
        if normalized:
            inv_sqrt = degree.clamp_min(1e-12).rsqrt()
            lap = torch.eye(m, dtype=torch.float64, device=pos.device) - inv_sqrt[..., :, None] * weights * inv_sqrt[..., None, :]
        else:
            lap = torch.diag_embed(degree) - weights
        eigenvalues, eigenvectors = torch.linalg.eigh(lap)
        # Deterministic signs (cosmetic: the interpolant only uses band projectors).
        idx = eigenvectors.abs().argmax(-2, keepdim=True)
        sign = torch.sign(torch.gather(eigenvectors, -2, idx))
        eigenvectors = eigenvectors * torch.where(sign == 0, torch.ones_like(sign), sign)
        if band_sizes is None:
            band = (torch.arange(m) * num_bands) // m
        else:
            band_sizes = [int(s) for s in band_sizes]
            if len(band_sizes) != num_bands or sum(band_sizes) != m or min(band_sizes) < 1:
                raise ValueError(f"band_sizes {band_sizes} must be {num_bands} positive ints summing to {m}")
            band = torch.repeat_interleave(torch.arange(num_bands), torch.tensor(band_sizes))
        self.register_buffer("eigenvalues", eigenvalues, persistent=False)  # [..., M]
        self.register_buffer("eigenvectors", eigenvectors.to(positions.dtype), persistent=False)  # [..., M, M]
        self.register_buffer("band_index", band[:, None].to(positions.device), persistent=False)  # [M, 1]

    def _basis_for(self, x):
        return self.eigenvectors.to(dtype=x.dtype, device=x.device)

    def forward(self, x):
        if x.dim() < 2 or x.shape[-2] != self.data_shape[0]:
            raise ValueError(f"LaplacianDecomposition: expected [..., {self.data_shape[0]}, C], got {tuple(x.shape)}")
        return self._basis_for(x).transpose(-1, -2) @ x

    def inverse(self, coeffs):
        if coeffs.dim() < 2 or coeffs.shape[-2] != self.data_shape[0]:
            raise ValueError(f"LaplacianDecomposition: expected [..., {self.data_shape[0]}, C], "
                             f"got {tuple(coeffs.shape)}")
        return self._basis_for(coeffs) @ coeffs

    def band_energies(self, x):
        c = self.forward(x).pow(2).sum(-1)  # [..., M]
        out = c.new_zeros(*c.shape[:-1], self.num_bands)
        return out.index_add_(-1, self.band_index[:, 0].to(c.device), c)
