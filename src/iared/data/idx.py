"""MNIST and Fashion-MNIST from their idx files (`.gz` or plain).

A data directory holds `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`. Only the files
a split needs are read, so a directory with just the test files still serves
`split="test"`; a missing file is a `DataError` that names it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import DataError, DataInfo, carve_split, check_split, normalize

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian: dataset-fashion-mnist

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(d) for d in range(10))

# Per-channel statistics of the training images in [0, 1] (the usual published values;
# MNIST's are also what the shared pretrained MNIST ViT expects).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzip-compressed or plain) into a numpy array.

    Args:
        path: the file.

    Returns:
        The array with the shape stored in the header.

    Raises:
        DataError: missing, truncated or not an idx file (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"idx file not found: {path}")
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read idx file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"not an idx file: {path}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"truncated idx file: {path}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != need:
        raise DataError(f"idx file {path} holds {len(data) - header} bytes of data, header says {need}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def find_idx_file(root: str | os.PathLike, stem: str, needed_for: str = "") -> Path:
    """Locate `stem` (e.g. "train-images-idx3-ubyte") in `root`, gzipped or plain.

    Also accepts the `train-images.idx3-ubyte` spelling some mirrors use.

    Raises:
        DataError: naming the expected file when none of the spellings exists.
    """
    root = Path(root)
    dotted = stem.replace("-idx", ".idx")
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        if (root / name).is_file():
            return root / name
    why = f", needed for the {needed_for!r} split" if needed_for else ""
    raise DataError(f"missing file {root / (stem + '.gz')} (or without .gz){why}")


def load_idx_split(root: str | os.PathLike, split: str, split_seed: int = 0,
                   val_size: int = 6000) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split of an idx data set.

    "train" and "val" are a deterministic partition (by `split_seed`) of the 60k training files,
    "test" is the t10k files.

    Args:
        root: directory of idx files.
        split: "train", "val" or "test".
        split_seed: seed of the train/val partition (kept apart from the run seed so that
            changing the run seed never moves validation items into training).
        val_size: number of training items held out as "val".

    Returns:
        (images, labels).
    """
    check_split(split)
    prefix = "t10k" if split == "test" else "train"
    images = read_idx(find_idx_file(root, f"{prefix}-images-idx3-ubyte", split))
    labels = read_idx(find_idx_file(root, f"{prefix}-labels-idx1-ubyte", split)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"idx files in {root} disagree: images {images.shape}, labels {labels.shape}")
    if split != "test":
        keep = carve_split(len(images), split, split_seed, val_size)
        images, labels = images[keep], labels[keep]
    return images, labels


def default_fashion_dir() -> Optional[str]:
    """The Debian package's Fashion-MNIST directory if it is installed, else None."""
    return FASHION_MNIST_SYSTEM_DIR if os.path.isdir(FASHION_MNIST_SYSTEM_DIR) else None


class IdxDataset(Dataset):
    """MNIST-style 28x28 grayscale digits or clothes from idx files, held in memory (47 MB max)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", split_seed: int = 0,
                 kind: str = "mnist", val_size: int = 6000,
                 mean: Optional[tuple[float, ...]] = None, std: Optional[tuple[float, ...]] = None):
        """
        Args:
            root: directory of idx files.
            split: "train", "val" (deterministic `val_size` items of train) or "test".
            split_seed: seed of the train/val partition (kept apart from the run seed so that
            changing the run seed never moves validation items into training).
            kind: "mnist" or "fashion-mnist" (class names and default mean/std).
            val_size: items held out from train as "val".
            mean, std: override the normalisation (e.g. (0,), (1,) for raw [0, 1] pixels).
        """
        if kind not in ("mnist", "fashion-mnist"):
            raise DataError(f"unknown idx data set kind {kind!r}")
        if not os.path.isdir(root):
            raise DataError(f"{kind}: not a directory: {root}")
        self.images, self.labels = load_idx_split(root, split, split_seed, val_size)
        fashion = kind == "fashion-mnist"
        names = FASHION_CLASSES if fashion else MNIST_CLASSES
        self.info = DataInfo(
            kind=kind, num_classes=len(names), class_names=names, in_chans=1,
            img_size=tuple(self.images.shape[1:3]),
            mean=tuple(mean) if mean is not None else (FASHION_MEAN if fashion else MNIST_MEAN),
            std=tuple(std) if std is not None else (FASHION_STD if fashion else MNIST_STD),
            has_masks=False)
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        x = torch.from_numpy(self.images[index].astype(np.float32) / 255.0)[None]  # (1, 28, 28)
        return {"image": normalize(x, self.info.mean, self.info.std), "label": int(self.labels[index])}
