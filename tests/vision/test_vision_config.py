"""Image config (resolved once, saved, rebuilt identically), batched generation, samples files, latent cache."""
import numpy as np
import pytest
import torch

from kflow.vision import ImageModelConfig, SamplingConfig, build_image_model, generate_images, sample_latents
from kflow.vision.artifacts import read_samples, write_samples


def test_wavelet_and_classes_are_resolved_once_and_survive_a_round_trip():
    config = ImageModelConfig(model="DiT-M/2", decomposition="wavelet", num_bands=2)
    assert config.wavelet is None and not config.complete
    with pytest.raises(ValueError, match="for_data"):
        build_image_model(config)
    complete = config.for_data((4, 8, 8), 10)
    assert complete.wavelet == "db4" and complete.num_classes == 10 and complete.latent_shape == (4, 8, 8)
    assert ImageModelConfig.from_dict({**complete.to_dict(), "dataset": "digits"}) == complete
    assert ImageModelConfig(num_classes=0).for_data((4, 8, 8), 10).num_classes == 0  # unconditional stays so
    assert ImageModelConfig(decomposition="fourier", wavelet="db6").wavelet is None  # only wavelets keep one


@pytest.mark.parametrize("options", [{"decomposition": "bogus"}, {"decomposition": "none", "num_bands": 2},
                                     {"model": "DiT-Q/3"}, {"ramp": "steep"}, {"order": "sideways"},
                                     {"prediction": "noise"}, {"windows": ((0.0, 1.0),)},
                                     {"windows": ((0.0, 1.0), (0.6, 0.5))}])
def test_invalid_configs_are_refused_when_made(options):
    with pytest.raises(ValueError):
        ImageModelConfig(**options)


def test_training_and_loading_build_the_same_model():
    config = ImageModelConfig(model="DiT-M/2", decomposition="fourier", num_bands=2, ramp="smooth", overlap=0.2,
                              prediction="x1", latent_shape=(4, 8, 8), num_classes=3)
    trained, flow = build_image_model(config, seed=0)
    loaded, flow2 = build_image_model(ImageModelConfig.from_dict(config.to_dict()))
    assert {k: v.shape for k, v in trained.state_dict().items()} == {k: v.shape for k, v in loaded.state_dict().items()}
    assert flow.prediction == flow2.prediction == "x1" and flow2.schedule.ramp == "smooth"
    assert torch.equal(flow.schedule.starts, flow2.schedule.starts)
    again, _ = build_image_model(config, seed=0)
    assert "windows" not in config.to_dict()  # records made before explicit windows existed stay identical
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values()))


def test_generation_is_batched_with_one_seed_per_batch():
    config = ImageModelConfig(model="DiT-M/2", latent_shape=(4, 4, 4), num_classes=2)
    dit, flow = build_image_model(config, seed=0)

    class Decoder:
        @staticmethod
        def decode(z):
            return z[:, :1] + 0.5

    labels = torch.tensor([0, 1, 0, 1, 1])
    images = generate_images(dit, flow, Decoder(), labels, sampling=SamplingConfig(steps=2, seed=3, batch_size=2))
    assert images.shape == (5, 1, 4, 4) and images.min() >= 0 and images.max() <= 1
    last = sample_latents(dit, flow, 1, labels[4:], steps=2, seed=3 + 4)  # the batch starting at sample 4
    assert torch.allclose(images[4:], (last[:, :1] + 0.5).clamp(0, 1))


def test_samples_file_round_trip_and_uint8_images(tmp_path):
    images, labels = torch.rand(3, 1, 4, 4), torch.tensor([2, 0, 1])
    write_samples(tmp_path / "s.npz", images, labels)
    got, got_labels = read_samples(tmp_path / "s.npz")
    assert torch.equal(got, images) and torch.equal(got_labels, labels)
    write_samples(tmp_path / "u.npz", images, None)
    assert read_samples(tmp_path / "u.npz")[1].tolist() == [-1, -1, -1]  # unconditional samples
    np.savez(tmp_path / "rgb.npz", images=np.full((2, 5, 5, 3), 255, dtype=np.uint8))
    rgb, none = read_samples(tmp_path / "rgb.npz")
    assert rgb.shape == (2, 3, 5, 5) and rgb.max() == 1 and none is None
    np.savez(tmp_path / "bad.npz", pixels=np.zeros(2))
    with pytest.raises(ValueError, match="bad.npz: no 'images'"):
        read_samples(tmp_path / "bad.npz")


def test_a_latent_cache_of_the_old_pickled_format_is_rebuilt_not_unpickled(tmp_path):
    import pickle

    import lmdb

    from kflow.vision import LatentCacheError, load_or_build_latent_cache, read_latent_cache

    env = lmdb.open(str(tmp_path / "old.lmdb"), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"000000", pickle.dumps((np.zeros((2, 1)), np.zeros(2))))
        txn.put(b"__meta__", pickle.dumps({"count": 2, "chunks": 1, "ae": "a"}))
    env.close()
    with pytest.raises(LatentCacheError, match="old.lmdb: .*never unpickled"):
        read_latent_cache(tmp_path / "old.lmdb")
    with pytest.warns(UserWarning, match="rebuilding the latent cache"):
        z, _, rebuilt = load_or_build_latent_cache(tmp_path / "old.lmdb", {"ae": "a"},
                                                   lambda: (torch.ones(2, 1), torch.arange(2)))
    assert rebuilt and torch.equal(read_latent_cache(tmp_path / "old.lmdb")[0], torch.ones(2, 1))


def test_explicit_windows_reach_the_schedule_and_survive_a_round_trip():
    """The low band keeps moving until t = 1 while the high band starts at 0.5: windows given as they are."""
    config = ImageModelConfig(model="DiT-M/2", decomposition="fourier", num_bands=2, windows=[[0, 1], [0.5, 1]],
                              latent_shape=(1, 8, 8), num_classes=2)
    assert config.windows == ((0.0, 1.0), (0.5, 1.0))
    again = ImageModelConfig.from_dict(config.to_dict())
    assert again == config
    _, flow = build_image_model(again)
    assert flow.schedule.starts.tolist() == [0.0, 0.5] and flow.schedule.ends.tolist() == [1.0, 1.0]
    s = flow.schedule.s(torch.tensor([0.25, 0.75]))
    assert torch.allclose(s, torch.tensor([[0.25, 0.0], [0.75, 0.5]], dtype=s.dtype))
