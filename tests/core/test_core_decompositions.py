"""Property tests of the K-amplitude decompositions: exact inverse, orthonormality, bands, invariances."""
import math

import pytest
import torch

from kflow.core import (FourierDecomposition, IdentityDecomposition, LaplacianDecomposition, PCADecomposition,
                        WaveletDecomposition, group_into_bands)

F64 = torch.float64


def _fourier_cases():
    return [((7,), 2), ((8,), 3), ((5, 6), 2), ((16, 16), 3), ((9, 7), 4), ((3, 4, 5), 2), ((4, 4, 4), 3)]


def _all_decompositions():
    torch.manual_seed(1)
    decs = [FourierDecomposition(s, k) for s, k in _fourier_cases()]
    decs += [WaveletDecomposition((32, 32), 3), WaveletDecomposition((16, 16), 4, wavelet="haar"),
             WaveletDecomposition((32, 32), 2, wavelet="db2")]
    data = torch.randn(300, 2, 4, 4, dtype=F64) * torch.linspace(0.1, 2.0, 32, dtype=F64).reshape(2, 4, 4)
    decs += [PCADecomposition.fit(data, 3), PCADecomposition.fit(data, 2, patch_size=2, grouping="energy")]
    decs += [LaplacianDecomposition(torch.randn(3, 17, 3, dtype=F64) * 4, 3), IdentityDecomposition((5, 3))]
    return decs


def _random_input(dec, lead=(3, 2)):
    if isinstance(dec, LaplacianDecomposition):
        return torch.randn(dec.eigenvectors.shape[0], dec.data_shape[0], 6, dtype=F64)
    return torch.randn(*lead, *dec.data_shape, dtype=F64)


@pytest.mark.parametrize("dec", _all_decompositions(), ids=lambda d: f"{type(d).__name__}{d.data_shape}")
def test_round_trip_and_energy(dec):
    x = _random_input(dec)
    c = dec(x)
    assert (dec.inverse(c) - x).abs().max() < 1e-10
    # Orthonormal: energy is preserved per sample, and the inverse of a coefficient vector preserves it too.
    assert torch.allclose(c.pow(2).sum(), x.pow(2).sum(), rtol=1e-12)
    c2 = torch.randn_like(c)
    assert torch.allclose(dec.inverse(c2).pow(2).sum(), c2.pow(2).sum(), rtol=1e-12)
    assert (dec(dec.inverse(c2)) - c2).abs().max() < 1e-10


@pytest.mark.parametrize("dec", _all_decompositions(), ids=lambda d: f"{type(d).__name__}{d.data_shape}")
def test_band_index_covers_all_bands(dec):
    assert dec.band_index.dtype == torch.long
    sizes = dec.band_sizes()
    assert sizes.numel() == dec.num_bands and (sizes > 0).all()
    c = dec(_random_input(dec))
    # band_index broadcasts against the coefficients of one sample
    torch.broadcast_shapes(dec.band_index.shape, c.shape[1:])
    energies = dec.band_energies(_random_input(dec))
    assert energies.shape[-1] == dec.num_bands


def test_fourier_basis_is_orthogonal_matrix():
    for shape in [(6,), (5, 4), (3, 3, 2)]:
        dec = FourierDecomposition(shape, 2)
        n = math.prod(shape)
        eye = torch.eye(n, dtype=F64).reshape(n, *shape)
        matrix = dec(eye).reshape(n, n)  # rows: coefficients of each basis vector
        assert torch.allclose(matrix @ matrix.T, torch.eye(n, dtype=F64), atol=1e-12)


def test_fourier_bands_follow_radial_frequency():
    dec = FourierDecomposition((16, 16), 3)
    # A constant image lives in band 0 only; a checkerboard (Nyquist) in the last band only.
    const = torch.ones(1, 16, 16, dtype=F64)
    idx = torch.arange(16)
    checker = ((-1.0) ** (idx[:, None] + idx[None, :])).to(F64)[None]
    assert torch.allclose(dec.band_energies(const)[0], torch.tensor([256.0, 0, 0], dtype=F64))
    e = dec.band_energies(checker)[0]
    assert e[:2].abs().max() < 1e-9 and abs(e[2] - 256.0) < 1e-9
    # Monotone: every coefficient of band b has radius <= every coefficient of band b+1
    for b in range(2):
        assert dec.radius[dec.band_index == b].max() <= dec.radius[dec.band_index == b + 1].min()


def test_fourier_hermitian_pairs_share_a_band():
    dec = FourierDecomposition((9, 10), 4)
    flat = dec.band_index.reshape(-1)
    assert torch.equal(flat, flat[dec.conj_index])


def test_wavelet_bands_are_levels():
    dec = WaveletDecomposition((32, 32), 3, wavelet="db6")
    assert dec.level == 2
    assert dec.band_sizes().tolist() == [64, 192, 768]
    # Haar has no boundary filters: a constant image lies entirely in the approximation band.
    haar = WaveletDecomposition((32, 32), 3, wavelet="haar")
    e = haar.band_energies(torch.ones(1, 32, 32, dtype=F64))[0]
    assert e[0] / e.sum() > 1 - 1e-12
    # db6 at the finest level: a single interior detail coefficient reconstructs to a localised, zero-mean atom.
    c = torch.zeros(1, 1024, dtype=F64)
    c[0, (dec.level_index == 2).nonzero()[8 * 16 + 8]] = 1.0  # centre of the finest H block
    atom = dec.inverse(c)[0]
    assert abs(atom.sum()) < 1e-8 and (atom.abs() > 1e-8).sum() <= 12 * 12


def test_wavelet_rejects_impossible_configuration():
    with pytest.raises(ValueError, match="bands"):
        WaveletDecomposition((32, 32), 4, wavelet="db6", level=2)
    with pytest.raises(ValueError):
        WaveletDecomposition((32,), 2)
    # db6 (filter length 12) has no level on an 8x8 grid; ptwt would silently return the identity (one band).
    with pytest.raises(ValueError, match="db6.*8x8"):
        WaveletDecomposition((8, 8), 2, wavelet="db6")
    assert WaveletDecomposition((8, 8), 2, wavelet="db4").band_index.unique().numel() == 2


def test_pca_orders_bands_by_variance_and_saves(tmp_path):
    scales = torch.linspace(3.0, 0.1, 16, dtype=F64)
    data = torch.randn(2000, 16, dtype=F64) * scales
    dec = PCADecomposition.fit(data, 2)
    assert torch.all(dec.explained_variance[:-1] >= dec.explained_variance[1:])
    e = dec.band_energies(data).mean(0)
    assert e[0] > 5 * e[1]
    dec.save(tmp_path / "pca.pt")
    loaded = PCADecomposition.load(tmp_path / "pca.pt")
    x = torch.randn(4, 16, dtype=F64)
    assert torch.equal(loaded(x), dec(x)) and torch.equal(loaded.band_index, dec.band_index)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="bad.pt"):
        PCADecomposition.load(tmp_path / "bad.pt")


def test_pca_rejects_nan():
    data = torch.randn(10, 4)
    data[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        PCADecomposition.fit(data, 2)


def _random_rotation(dtype=F64):
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _band_projectors(dec):
    u = dec.eigenvectors
    return [u[..., dec.band_index[:, 0] == b] @ u[..., dec.band_index[:, 0] == b].transpose(-1, -2)
            for b in range(dec.num_bands)]


def test_laplacian_invariant_to_rigid_motion():
    pos = torch.randn(2, 17, 3, dtype=F64) * 5
    moved = pos @ _random_rotation().T + torch.randn(3, dtype=F64) * 10
    a, b = LaplacianDecomposition(pos, 3), LaplacianDecomposition(moved, 3)
    assert torch.allclose(a.eigenvalues, b.eigenvalues, atol=1e-9)
    for pa, pb in zip(_band_projectors(a), _band_projectors(b)):
        assert torch.allclose(pa, pb, atol=1e-8)


def test_laplacian_permutation_equivariant():
    pos = torch.randn(17, 3, dtype=F64) * 5
    perm = torch.randperm(17)
    a, b = LaplacianDecomposition(pos, 3), LaplacianDecomposition(pos[perm], 3)
    for pa, pb in zip(_band_projectors(a), _band_projectors(b)):
        assert torch.allclose(pa[perm][:, perm], pb, atol=1e-8)
    # The first mode is the constant (whole-cluster) mode with eigenvalue 0.
    assert abs(a.eigenvalues[0]) < 1e-10
    assert torch.allclose(a.eigenvectors[:, 0].abs(), torch.full((17,), 17 ** -0.5, dtype=F64), atol=1e-8)


def test_laplacian_input_errors():
    with pytest.raises(ValueError, match=r"\[M, 3\]"):
        LaplacianDecomposition(torch.randn(17, 2), 2)
    with pytest.raises(ValueError, match="num_bands"):
        LaplacianDecomposition(torch.randn(4, 3), 5)
    bad = torch.randn(17, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        LaplacianDecomposition(bad, 2)
    dec = LaplacianDecomposition(torch.randn(17, 3), 2)
    with pytest.raises(ValueError, match="17"):
        dec(torch.randn(16, 6))


def test_wrong_trailing_shape_is_reported():
    dec = FourierDecomposition((8, 8), 2)
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        dec(torch.randn(2, 8, 7))


def test_group_into_bands_keeps_ties_together():
    values = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0, 3.0])
    bands = group_into_bands(values, 2)
    assert bands[1] == bands[2] == bands[3]
    assert bands.min() == 0 and bands.max() == 1
