"""Image data sets: Fashion-MNIST (IDX files), scikit-learn digits, a generic image folder, and the padding that
puts small images on a power-of-two grid.

All loaders return ``(images, labels)``: float tensors [N, C, H, W] in [0, 1] and long labels [N].
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_idx", "load_fashion_mnist", "load_digits", "load_image_folder", "load_image_dataset",
           "FASHION_MNIST_DIR", "FASHION_MNIST_ENV", "DataNotFoundError", "fashion_mnist_root",
           "add_data_root_argument", "pad_to", "crop_to"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package installs the IDX files
FASHION_MNIST_ENV = "KFLOW_FASHION_MNIST"  # another folder holding them
FASHION_MNIST_INSTALL = (f"as root run `apt-get install dataset-fashion-mnist` (or `make data`), or set "
                         f"{FASHION_MNIST_ENV} or --data-root to a folder holding the four IDX files")


class DataNotFoundError(FileNotFoundError):
    """A data set that is not on this machine; the message says what to run (scripts print it as one line)."""


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The Fashion-MNIST folder: ``root`` if given, else $KFLOW_FASHION_MNIST, else the Debian package's folder."""
    return Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def add_data_root_argument(parser) -> None:
    """The one ``--data-root`` flag every image script takes."""
    parser.add_argument("--data-root", default=None,
                        help=f"folder with the Fashion-MNIST IDX files (default: ${FASHION_MNIST_ENV}, else "
                             f"{FASHION_MNIST_DIR}, where `apt-get install dataset-fashion-mnist` puts them)")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped). Raises ``ValueError`` naming the file for a bad magic number or a
    size that does not match the header (truncated download)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such IDX file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot be decompressed ({err}); the file is truncated or not gzip") from err
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX file (truncated or empty)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000, a type code among "
                         f"{', '.join(f'{c:02x}' for c in _IDX_TYPES)}, then the number of dimensions)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX size mismatch: header promises {shape} ({expected} bytes), file has "
                         f"{len(data)} bytes (truncated or corrupt)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None):
    """Fashion-MNIST from IDX files in ``fashion_mnist_root(root)`` (the Debian package ``dataset-fashion-mnist``
    installs them at /usr/share/datasets/fashion-mnist/). Returns ([N, 1, 28, 28] in [0, 1], labels [N]).
    Missing files raise ``DataNotFoundError`` saying how to get them."""
    root = fashion_mnist_root(root)
    prefix = {"train": "train", "test": "t10k"}[split]
    found = {}
    for kind, nd in (("images", "idx3"), ("labels", "idx1")):
        candidates = [root / f"{prefix}-{kind}-{nd}-ubyte.gz", root / f"{prefix}-{kind}-{nd}-ubyte"]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            raise DataNotFoundError(f"Fashion-MNIST not found: no {candidates[1].name}[.gz] in {root}; "
                                    f"{FASHION_MNIST_INSTALL}")
        found[kind] = read_idx(path)
    images, labels = found["images"], found["labels"]
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels for the {split} split")
    return torch.from_numpy(images.astype(np.float32) / 255.0)[:, None], torch.from_numpy(labels.astype(np.int64))


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 8×8 digits (1797 images, shipped in the wheel): ([N, 1, 8, 8] in [0, 1], labels)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(images)))
    idx = perm[n_test:] if split == "train" else perm[:n_test]
    return images[idx], labels[idx]


def load_image_folder(root: str | os.PathLike, size: int | None = None, grayscale: bool = False):
    """Images under root/<class>/*.{png,jpg,...}; class ids by sorted folder name."""
    from PIL import Image

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"{root}: expected one sub-folder of images per class")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"):
                continue
            try:
                img = Image.open(f)
                img = img.convert("L" if grayscale else "RGB")
            except Exception as err:
                raise ValueError(f"{f}: cannot be read as an image ({err})") from err
            if size:
                img = img.resize((size, size), Image.BICUBIC)
            arr = np.asarray(img, dtype=np.float32) / 255.0
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise FileNotFoundError(f"{root}: no images found")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"{root}: images have different sizes {sorted(shapes)[:3]}; pass size=")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def load_image_dataset(name: str, split: str = "train", root: str | None = None):
    """"fashion-mnist", "digits" or a folder path."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split, root)
    if name == "digits":
        return load_digits(split)
    return load_image_folder(name)


def pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad [N, C, H, W] symmetrically to size × size (28 -> 32 keeps Fashion-MNIST on a power-of-two grid)."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} images to {size}")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(images, (left, size - w - left, top, size - h - top))


def crop_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop [N, C, H, W] to size × size: the inverse of ``pad_to`` (32 -> 28 gives Fashion-MNIST's frame)."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {h}x{w} images to {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]
