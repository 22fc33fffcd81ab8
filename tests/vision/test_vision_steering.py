"""Steerable generation on latents: noise splitting per band, condition dropping at τ, figure grids, guidance."""
import numpy as np
import pytest
import torch

from kflow.core import BandSchedule, KFlow
from kflow.vision import DiT, build_decomposition, choose_wavelet
from kflow.vision.artifacts import save_image_grid
from kflow.vision.sampling import sample_latents
from kflow.vision.steering import grouped_noise, sample_kept_and_dropped, steering_figures


def tiny_dit(num_classes=3):
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                num_classes=num_classes)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@pytest.mark.parametrize("name", ["fourier", "wavelet", "pca"])
def test_noise_splitting_shares_exactly_the_chosen_bands(name):
    fit = torch.randn(256, 4, 8, 8).cumsum(-1)  # some structure for PCA
    dec = build_decomposition(name, (4, 8, 8), 3, fit_data=fit)
    for shared in ([0], [1, 2]):
        noise = grouped_noise((6, 4, 8, 8), dec, shared, group_size=3, seed=1)
        c = dec(noise)  # [6, 4, 8, 8] coefficients (PCA: [6, D])
        mask = dec.band_mask(shared)
        sel, rest = c[..., mask], c[..., ~mask]
        for g in (0, 3):  # within a group: shared bands equal, the others differ
            assert torch.allclose(sel[g + 1:g + 3], sel[g:g + 1].expand_as(sel[g + 1:g + 3]), atol=1e-5)
            assert (rest[g + 1] - rest[g]).abs().min() > 0
        assert not torch.allclose(sel[0], sel[3])  # different groups draw different shared noise
        # still standard Gaussian noise: the orthonormal split keeps the per-coefficient scale
        assert 0.7 < noise.std() < 1.3


def test_condition_is_dropped_exactly_from_tau_on():
    model = tiny_dit()
    seen = []
    forward = model.forward

    def spy(x, t, y=None):
        seen.append((t.clone(), y.clone()))
        return forward(x, t, y)

    model.forward = spy
    flow = KFlow(build_decomposition("fourier", (4, 8, 8), 2), BandSchedule(2))
    labels = torch.tensor([0, 2])
    sample_latents(model, flow, 2, labels, steps=10, method="euler", condition_tau=0.3)
    times = torch.stack([t[0] for t, _ in seen])
    assert torch.allclose(times, torch.linspace(0, 0.9, 10))
    for t, y in seen:
        expected = labels if t[0] < 0.3 else torch.full_like(labels, 3)
        assert torch.equal(y, expected), (float(t[0]), y)
    seen.clear()
    sample_latents(model, flow, 2, labels, steps=10, method="euler")  # no τ: the condition is never dropped
    assert all(torch.equal(y, labels) for _, y in seen)


def test_kept_and_dropped_share_the_start_and_diverge():
    model = tiny_dit()
    flow = KFlow(build_decomposition("fourier", (4, 8, 8), 2), BandSchedule(2))
    labels = torch.tensor([0, 1])
    kept, dropped = sample_kept_and_dropped(model, flow, labels, tau=1.0, steps=4, method="euler")
    assert torch.allclose(kept, dropped)  # τ = 1 keeps the condition everywhere
    kept, dropped = sample_kept_and_dropped(model, flow, labels, tau=0.5, steps=4, method="euler")
    assert not torch.allclose(kept, dropped)
    with pytest.raises(ValueError, match="class-conditional"):
        sample_kept_and_dropped(tiny_dit(num_classes=0), flow, labels)


def test_guided_sampling_with_scale_one_equals_conditional_sampling():
    model = tiny_dit()
    flow = KFlow(build_decomposition("wavelet", (4, 8, 8), 2), BandSchedule(2))
    labels = torch.tensor([1, 2])
    a = sample_latents(model, flow, 2, labels, steps=3, cfg_scale=1.0, seed=5)
    b = sample_latents(model, flow, 2, labels, steps=3, cfg_scale=2.0, seed=5)
    c = flow.sample(lambda x, t, y: model(x, t, y), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)),
                    steps=3, method="heun", model_kwargs={"y": labels})
    assert torch.allclose(a, c, atol=1e-6) and not torch.allclose(a, b)


def test_wavelet_choice_fits_the_grid():
    assert choose_wavelet(32, 3) == "db6" and choose_wavelet(8, 2) == "db4" and choose_wavelet(8, 4) == "haar"
    assert build_decomposition("wavelet", (4, 8, 8), 2).band_index.bincount().tolist() == [16, 48]  # 1 level
    with pytest.raises(ValueError, match="db6.*shorter wavelet"):
        build_decomposition("wavelet", (4, 8, 8), 2, wavelet="db6")


def test_figures_are_written_as_png_grids(tmp_path):
    from PIL import Image

    model = tiny_dit()
    flow = KFlow(build_decomposition("fourier", (4, 8, 8), 2), BandSchedule(2))

    class Decoder:  # latents [N, 4, 8, 8] -> grey images [N, 1, 8, 8]
        @staticmethod
        def decode(z):
            return torch.sigmoid(z[:, :1])

    figs = steering_figures(model, flow, Decoder(), tmp_path, pairs=2, steps=2)
    assert set(figs) == {"share_low_bands", "share_high_bands", "condition_kept_vs_dropped"}
    for path in figs.values():
        assert Image.open(path).size == (4 * 10, 1 * 10)  # 2 pairs side by side, 8 px + 2 px border each
    grid = np.asarray(Image.open(save_image_grid(torch.zeros(3, 3, 4, 4), tmp_path / "g.png", nrow=2)))
    assert grid.shape == (12, 12, 3) and grid[1:5, 1:5].max() == 0 and grid[0].min() == 255
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left
