"""Latent spaces: the conv autoencoder kflow trains, identity, diffusers AutoencoderKL; the LMDB latent cache."""
import pytest
import torch

from kflow.vision import (ConvAutoencoder, DiffusersVAE, IdentityAutoencoder, LatentCacheError, encode_dataset,
                          load_autoencoder, load_digits, load_or_build_latent_cache, read_latent_cache,
                          train_autoencoder, write_latent_cache)


@pytest.fixture(scope="module")
def digits_autoencoder():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster than two on a loaded machine
    images, _ = load_digits("train")
    ae = train_autoencoder(images, steps=60, batch_size=64, lr=3e-3, progress=False, downsample=1, width=16)
    torch.set_num_threads(threads)
    return ae, images


def test_round_trip_on_digits_beats_the_mean_image(digits_autoencoder):
    ae, train = digits_autoencoder
    test, _ = load_digits("test")
    with torch.no_grad():
        z = ae.encode(test)
        rec = ae.decode(z)
    assert z.shape == (len(test), 4, 4, 4) and ae.latent_shape == (4, 4, 4)
    assert rec.shape == test.shape and rec.min() >= 0 and rec.max() <= 1
    mean_image_err = (test - train.mean(0)).pow(2).mean()
    assert (rec - test).pow(2).mean() < 0.5 * mean_image_err


def test_latents_are_normalised_per_channel(digits_autoencoder):
    ae, train = digits_autoencoder
    z = encode_dataset(ae, train[:1024])
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=0.05)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(4), atol=0.05)


def test_save_load_round_trip_and_bad_files(digits_autoencoder, tmp_path):
    ae, train = digits_autoencoder
    ae.save(tmp_path / "ae.pt")
    loaded = load_autoencoder(tmp_path / "ae.pt")
    with torch.no_grad():
        assert torch.equal(loaded.encode(train[:8]), ae.encode(train[:8]))
    assert [p.name for p in tmp_path.iterdir()] == ["ae.pt"]  # atomic write left no temporary behind
    data = (tmp_path / "ae.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt: cannot be read"):
        load_autoencoder(tmp_path / "cut.pt")
    torch.save({"kind": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a kflow autoencoder"):
        load_autoencoder(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_autoencoder(tmp_path / "none.pt")


def test_conv_autoencoder_shapes_for_padded_fashion_mnist():
    ae = ConvAutoencoder(in_channels=1, image_size=32, latent_channels=4, width=8, downsample=2)
    assert ae.latent_shape == (4, 8, 8) and ae.encode(torch.rand(2, 1, 32, 32)).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="divisible"):
        ConvAutoencoder(image_size=28, downsample=3)


def test_identity_latent_space():
    ae = IdentityAutoencoder((1, 8, 8))
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(ae.decode(ae.encode(x)), x) and ae.encode(x).min() >= -1


def test_diffusers_vae_wrapper_with_a_tiny_random_config(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    wrapped = DiffusersVAE.from_pretrained(str(tmp_path / "vae"), image_size=16).eval()
    assert wrapped.latent_shape == (4, 8, 8)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        z = wrapped.encode(x)
        mean = vae.encode(2 * x - 1).latent_dist.mean
        assert z.shape == (2, 4, 8, 8) and torch.allclose(z, 0.18215 * mean, atol=1e-5)
        assert torch.equal(wrapped.encode(x), z)  # the posterior mean is deterministic
        wrapped.sample_posterior = True
        assert not torch.allclose(wrapped.encode(x), z)  # ... a posterior sample is not
        out = wrapped.decode(z)
        assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
        assert torch.allclose(out, ((vae.decode(mean).sample + 1) / 2).clamp(0, 1), atol=1e-5)
        assert wrapped.encode(torch.rand(1, 1, 16, 16)).shape == (1, 4, 8, 8)  # grey images are repeated to RGB


def test_latent_cache_round_trip_atomic_and_rebuild(tmp_path):
    latents, labels = torch.randn(10, 4, 2, 2), torch.arange(10)
    path = write_latent_cache(tmp_path / "lat.lmdb", latents, labels, {"ae": "a"}, chunk=3)
    z, y, meta = read_latent_cache(path)
    assert torch.equal(z, latents) and torch.equal(y, labels)
    assert meta["count"] == 10 and meta["chunks"] == 4 and meta["ae"] == "a" and meta["latent_shape"] == [4, 2, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat.lmdb"]  # built under a temporary name, renamed
    calls = []

    def build():
        calls.append(1)
        return latents + 1, labels

    z, _, rebuilt = load_or_build_latent_cache(path, {"ae": "a"}, build)
    assert not rebuilt and not calls and torch.equal(z, latents)  # cache hit
    z, _, rebuilt = load_or_build_latent_cache(path, {"ae": "b"}, build)
    assert rebuilt and calls and torch.equal(z, latents + 1)  # a different autoencoder invalidates the cache
    assert torch.equal(read_latent_cache(path)[0], latents + 1)


def test_latent_cache_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no latent cache"):
        read_latent_cache(tmp_path / "nothing")
    import lmdb

    env = lmdb.open(str(tmp_path / "partial"), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"000000", b"x")
    env.close()
    with pytest.raises(LatentCacheError, match="partial: latent cache has no metadata"):
        read_latent_cache(tmp_path / "partial")
    with pytest.raises(ValueError, match="0 latents|empty"):
        write_latent_cache(tmp_path / "empty", torch.zeros(0, 1), torch.zeros(0))
    with pytest.raises(ValueError, match="labels"):
        write_latent_cache(tmp_path / "bad", torch.zeros(3, 1), torch.zeros(2))
    assert not (tmp_path / "bad").exists()
