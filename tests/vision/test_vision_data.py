"""Image data: IDX reader (gz and raw) with clear errors, Fashion-MNIST layout, digits, image folders."""
import gzip
import struct

import numpy as np
import pytest
import torch

from kflow.vision.data import load_digits, load_fashion_mnist, load_image_dataset, load_image_folder, pad_to, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    return bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape) + array.tobytes()


def write_fashion_folder(root, n_train=6, n_test=4, gz=True):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, nd, arr in (("images", "idx3", images), ("labels", "idx1", labels)):
            name = root / f"{prefix}-{kind}-{nd}-ubyte{'.gz' if gz else ''}"
            name.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
    return root


def test_idx_round_trip_raw_and_gz(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    b = np.array([[1, -2], [300000, 4]], dtype=">i4")
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(a)))
    (tmp_path / "b").write_bytes(idx_bytes(b))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    assert np.array_equal(read_idx(tmp_path / "b"), b)


def test_idx_reader_rejects_truncated_and_corrupt_files(tmp_path):
    data = idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8))
    (tmp_path / "short").write_bytes(data[:-5])
    with pytest.raises(ValueError, match=r"short: IDX size mismatch.*\(5, 28, 28\)"):
        read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="long: IDX size mismatch"):
        read_idx(tmp_path / "long")
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x03" + data[4:])
    with pytest.raises(ValueError, match="magic: bad IDX magic number 0x01020803"):
        read_idx(tmp_path / "magic")
    (tmp_path / "header").write_bytes(data[:9])
    with pytest.raises(ValueError, match="header: truncated IDX header"):
        read_idx(tmp_path / "header")
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(data)[:-10])
    with pytest.raises(ValueError, match="trunc.gz.*truncated"):
        read_idx(tmp_path / "trunc.gz")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="empty: 0 bytes, too short"):
        read_idx(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_idx(tmp_path / "missing")


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_layout_from_any_folder(tmp_path, gz):
    root = write_fashion_folder(tmp_path / "fm", gz=gz)
    images, labels = load_fashion_mnist("train", root)
    assert images.shape == (6, 1, 28, 28) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and labels.tolist() == [0, 1, 2, 3, 4, 5]
    test_images, _ = load_fashion_mnist("test", root)
    assert test_images.shape == (4, 1, 28, 28)
    assert load_image_dataset("fashion-mnist", "test", str(root))[0].shape == (4, 1, 28, 28)


def test_fashion_mnist_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    root = write_fashion_folder(tmp_path / "fm")
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, dtype=np.uint8))))
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        load_fashion_mnist("train", root)


def test_digits_split_is_disjoint_and_normalised():
    train, ytrain = load_digits("train")
    test, ytest = load_digits("test")
    assert train.shape[1:] == (1, 8, 8) and len(train) + len(test) == 1797
    assert train.max() <= 1 and train.min() >= 0 and set(ytrain.tolist()) == set(range(10))
    flat_train = {tuple(v) for v in train.flatten(1).tolist()}
    assert sum(tuple(v) in flat_train for v in test.flatten(1).tolist()) < 5  # (a few digits are duplicates)


def test_image_folder_classes_resize_and_bad_file(tmp_path):
    from PIL import Image

    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (10, 12), (value, value, value)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    images, labels = load_image_folder(tmp_path, size=8)
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1]
    assert images[:2].max() == 0 and images[2:].min() == 1
    grey, _ = load_image_folder(tmp_path, size=8, grayscale=True)
    assert grey.shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="different sizes"):
        Image.new("RGB", (5, 5)).save(tmp_path / "cat" / "odd.png")
        load_image_folder(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: cannot be read"):
        load_image_folder(tmp_path, size=8)


def test_pad_to_centres_the_image():
    x = torch.ones(2, 1, 28, 28)
    y = pad_to(x, 32)
    assert y.shape == (2, 1, 32, 32) and y.sum() == x.sum() and torch.equal(y[..., 2:30, 2:30], x)
    with pytest.raises(ValueError):
        pad_to(x, 16)
