"""Cluttered classification with ground-truth object masks, generated on the fly.

Each image is one source item (a Fashion-MNIST 28x28 item, or a scikit-learn handwritten
digit upsampled to 24x24) pasted at a random position on a larger black canvas (48x48 by
default: 144 patch tokens at patch 4, the item covering 34 % / 25 % of it), plus clutter:
square fragments (6 of 8x8 by default) cut from *other* items of the same split and
placed at random positions. The label is the item's class and the mask is the item's
pixels (intensity > `MASK_THRESHOLD`) where they land on the canvas, so a heatmap can be
scored as a segmentation of the object that decides the label.

Overlap rule: the item is pasted last and its masked pixels overwrite whatever clutter
lies under them, so the canvas under the mask equals the item exactly; where the item is
background (below the threshold), clutter stays visible (pixel-wise max). Clutter
fragments combine with each other by max as well.

Every image is a pure function of (seed, split, epoch, index): nothing but the small
source items is held in memory. `set_epoch` re-draws positions and clutter on the train
split (augmentation that keeps masks exact); val and test ignore it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .base import DataError, DataInfo, check_split, existing_path
from .idx import FASHION_CLASSES, default_fashion_dir, load_idx_split

MASK_THRESHOLD = 25          # uint8 item intensity above which a pixel belongs to the item (~0.1)
MAX_ITEM_FRACTION = 0.40     # an item may cover at most this share of the canvas area
MIN_TOKENS = 100             # the canvas must give at least this many patch tokens
RECOMMENDED_PATCH = 4        # patch size the two rules above are checked at
FASHION_VAL_SIZE = 5000      # Fashion-MNIST training items held out as "val"
DIGITS_ITEM_SIZE = 24        # 8x8 digits are upsampled to this side
# Canvases per held-out digit in val and test: 180 digits x 6 = 1080 canvases, so a top-1
# near 90 % carries a standard error under 1 point (180 would give 2.2).
DIGITS_EVAL_REPEATS = 6

# Mean / std of canvas pixels in [0, 1] for the default configuration (48x48 canvas,
# 6 fragments of 8x8, seed 0, train split), measured with `measure_stats` over 2000
# images; `tests/data/test_cluttered.py` re-measures them. Other configurations measure
# their own statistics at construction.
DEFAULT_STATS = {
    "cluttered-fashion": ((0.1619,), (0.3030,)),
    "cluttered-digits": ((0.1422,), (0.2784,)),
}

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class ClutteredDataset(Dataset):
    """Items pasted on a cluttered canvas; returns {"image", "label", "mask"}."""

    def __init__(self, items: np.ndarray, labels: np.ndarray, split: str, seed: int = 0,
                 kind: str = "cluttered", class_names: Sequence[str] = (),
                 canvas_size: int = 48, num_fragments: int = 6, fragment_size: int = 8,
                 mask_threshold: int = MASK_THRESHOLD, patch_size: int = RECOMMENDED_PATCH,
                 repeats: int = 1, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        """
        Args:
            items: (N, h, w) uint8 source items of this split (N >= 2: clutter comes from others).
            labels: (N,) class of each item.
            split: "train", "val" or "test" (part of the random key; only train uses epochs).
            seed: generation seed.
            kind: name recorded in `info.kind`.
            class_names: names of the classes (default: "0", "1", ...).
            canvas_size: side of the square canvas.
            num_fragments: clutter fragments per image (0: no clutter).
            fragment_size: side of each square fragment (<= item side).
            mask_threshold: uint8 intensity above which an item pixel is in the mask.
            patch_size: the patch size the >= 100 tokens rule is checked at.
            repeats: canvases per source item: item i appears at indices i, i + N, i + 2N, ...,
                each time at another position with other clutter (a larger evaluation
                split from few items).
            mean, std: normalisation; default: `DEFAULT_STATS` for the default
                configuration, else measured on this split (epoch 0, first 1000 images).
        """
        check_split(split)
        items = np.ascontiguousarray(items, dtype=np.uint8)
        if items.ndim != 3 or len(items) < 2:
            raise DataError(f"{kind}: need at least 2 source items of shape (h, w), got {items.shape}")
        n, h, w = items.shape
        if (canvas_size // patch_size) ** 2 < MIN_TOKENS:
            raise DataError(f"{kind}: canvas {canvas_size} gives {(canvas_size // patch_size) ** 2} tokens "
                            f"at patch {patch_size}; need >= {MIN_TOKENS}")
        if h * w > MAX_ITEM_FRACTION * canvas_size ** 2:
            raise DataError(f"{kind}: a {h}x{w} item covers {h * w / canvas_size ** 2:.0%} of a "
                            f"{canvas_size}x{canvas_size} canvas; at most {MAX_ITEM_FRACTION:.0%} allowed")
        if repeats < 1:
            raise DataError(f"{kind}: repeats must be >= 1, got {repeats}")
        if not 0 < fragment_size <= min(h, w):
            raise DataError(f"{kind}: fragment size {fragment_size} must be in [1, {min(h, w)}]")
        self.items = items
        self.labels = np.asarray(labels, dtype=np.int64)
        self.split, self.seed, self.epoch, self.repeats = split, int(seed), 0, int(repeats)
        self.canvas_size, self.num_fragments, self.fragment_size = canvas_size, num_fragments, fragment_size
        self.mask_threshold = mask_threshold
        # Fragments are cut from the central part of a source item, where items have
        # content; a crop from the empty border would add no clutter.
        span = h - fragment_size, w - fragment_size
        self._crop_lo = (span[0] // 4, span[1] // 4)
        self._crop_hi = (span[0] - span[0] // 4 + 1, span[1] - span[1] // 4 + 1)
        # Upper bounds (exclusive) of the integers drawn for one image, in draw order:
        # item y, item x, then per fragment: source offset, crop y, crop x, canvas y, canvas x.
        frag = [n - 1, self._crop_hi[0] - self._crop_lo[0], self._crop_hi[1] - self._crop_lo[1],
                canvas_size - fragment_size + 1, canvas_size - fragment_size + 1]
        self._bounds = np.array([canvas_size - h + 1, canvas_size - w + 1] + frag * num_fragments, dtype=np.int64)

        names = tuple(class_names) or tuple(str(c) for c in range(int(self.labels.max()) + 1))
        if mean is None or std is None:
            default = (canvas_size, num_fragments, fragment_size, mask_threshold) == (48, 6, 8, MASK_THRESHOLD)
            if default and kind in DEFAULT_STATS:
                mean, std = DEFAULT_STATS[kind]
            else:
                mean, std = measure_stats(self, min(len(self), 1000))
        self.info = DataInfo(kind=kind, num_classes=len(names), class_names=names, in_chans=1,
                             img_size=(canvas_size, canvas_size), mean=tuple(mean), std=tuple(std),
                             has_masks=True)

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def set_epoch(self, epoch: int) -> None:
        """Re-draw positions and clutter for `epoch` (train split only; val/test never change).

        With DataLoader workers, call it before each epoch's iterator is created (workers
        copy the data set when they start, so `persistent_workers` would miss it).
        """
        if self.split == "train":
            self.epoch = int(epoch)

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The uint8 canvas (S, S), bool mask (S, S) and label of canvas `index`."""
        n, h, w = self.items.shape
        s, f = self.canvas_size, self.fragment_size
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], self.epoch, index])
        index = index % n  # the source item; the random key above keeps each repeat distinct
        r = rng.integers(0, self._bounds)
        canvas = np.zeros((s, s), dtype=np.uint8)
        for k in range(self.num_fragments):
            src, cy, cx, y, x = r[2 + 5 * k: 7 + 5 * k]
            src = src + (src >= index)  # any item but this one
            cy, cx = cy + self._crop_lo[0], cx + self._crop_lo[1]
            region = canvas[y:y + f, x:x + f]
            np.maximum(region, self.items[src, cy:cy + f, cx:cx + f], out=region)
        item = self.items[index]
        iy, ix = int(r[0]), int(r[1])
        inside = item > self.mask_threshold                                   # (h, w)
        box = canvas[iy:iy + h, ix:ix + w]
        box[...] = np.where(inside, item, np.maximum(box, item))
        mask = np.zeros((s, s), dtype=bool)
        mask[iy:iy + h, ix:ix + w] = inside
        return canvas, mask, int(self.labels[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        canvas, mask, label = self.generate(index % len(self))
        # (canvas / 255 - mean) / std as one multiply-add in numpy: small torch ops cost
        # more than the whole generation at this image size.
        x = canvas.astype(np.float32)
        x *= np.float32(1.0 / (255.0 * self.info.std[0]))
        x -= np.float32(self.info.mean[0] / self.info.std[0])
        return {"image": torch.from_numpy(x)[None], "label": label, "mask": torch.from_numpy(mask)}


def measure_stats(dataset: ClutteredDataset, n: int = 2000) -> tuple[tuple[float], tuple[float]]:
    """Pixel mean and std (in [0, 1]) over the canvases of the first `n` items, at the
    data set's current epoch. Deterministic: the canvases are.
    """
    n = min(n, len(dataset))
    total = total_sq = 0.0
    for i in range(n):
        c = dataset.generate(i)[0].astype(np.float64) / 255.0
        total += c.sum()
        total_sq += np.square(c).sum()
    count = n * dataset.canvas_size ** 2
    mean = float(total / count)
    std = float(np.sqrt(max(total_sq / count - mean ** 2, 1e-12)))
    return (round(mean, 4),), (round(std, 4),)


# ----------------------------------------------------------------------- the two kinds


@functools.lru_cache(maxsize=4)
def digit_items(item_size: int = DIGITS_ITEM_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits as (1797, S, S) uint8 items and labels.

    The 8x8 images (values 0-16) are scaled to 0-255 and upsampled bilinearly to
    `item_size`. Cached: every split and seed shares the same array.
    """
    images, target = _load_sklearn_digits()
    small = np.round(images * (255.0 / 16.0)).astype(np.uint8)              # (1797, 8, 8)
    items = np.stack([np.asarray(Image.fromarray(im).resize((item_size, item_size), Image.BILINEAR))
                      for im in small])
    items.setflags(write=False)
    return items, target


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float images in 0-16 and int64 labels of scikit-learn's bundled digits.

    Reads the CSV that scikit-learn ships directly when it is where scikit-learn keeps it
    (importing `sklearn.datasets` costs ~1.5 s, reading the file ~0.1 s); otherwise falls
    back to `sklearn.datasets.load_digits`, which reads the same file.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataError("cluttered-digits needs scikit-learn: pip install 'iared[data]'")
    csv = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    if os.path.isfile(csv):
        table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        if table.shape == (1797, 65):
            return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


def digits_split(n: int, split: str, split_seed: int = 0) -> np.ndarray:
    """Deterministic ~80/10/10 train/val/test indices of `n` digits (sorted)."""
    check_split(split)
    perm = np.random.default_rng([split_seed, 0xD161]).permutation(n)
    n_test = n_val = round(0.1 * n)
    part = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}[split]
    return np.sort(part)


def cluttered_digits(split: str = "train", seed: int = 0, split_seed: int = 0,
                     item_size: int = DIGITS_ITEM_SIZE, **kw: Any) -> ClutteredDataset:
    """The embedded default: scikit-learn digits on a cluttered 48x48 canvas (no files needed).

    Args:
        split: "train" (1437 digits, one canvas each per epoch), "val" or "test" (180 digits
            each, kept out of training, on `DIGITS_EVAL_REPEATS` canvases each: 1080 canvases;
            the digits repeat, their positions and clutter do not).
        seed: generation seed.
        split_seed: seed of the fixed 80/10/10 partition.
        item_size: side of the upsampled digits.
        **kw: `ClutteredDataset` options (canvas_size, num_fragments, fragment_size, ...).

    Returns:
        A `ClutteredDataset`.
    """
    items, labels = digit_items(item_size)
    keep = digits_split(len(items), split, split_seed)
    kw.setdefault("repeats", 1 if split == "train" else DIGITS_EVAL_REPEATS)
    return ClutteredDataset(items[keep], labels[keep], split, seed, kind="cluttered-digits",
                            class_names=tuple(str(d) for d in range(10)), **kw)


def cluttered_fashion(path: Optional[str] = None, split: str = "train", seed: int = 0,
                      split_seed: int = 0, **kw: Any) -> ClutteredDataset:
    """Fashion-MNIST items on a cluttered 48x48 canvas.

    Args:
        path: directory of Fashion-MNIST idx files (default: the Debian package's
            /usr/share/datasets/fashion-mnist when installed).
        split: "train" (55k), "val" (deterministic 5k of the 60k training items) or "test" (10k).
        seed: generation seed.
        split_seed: seed of the train/val partition.
        **kw: `ClutteredDataset` options.

    Returns:
        A `ClutteredDataset`.
    """
    check_split(split)
    path = path or default_fashion_dir()
    if path is None:
        raise DataError("cluttered-fashion needs the Fashion-MNIST idx files: use cluttered-fashion:DIR "
                        "(or install the Debian package dataset-fashion-mnist)")
    existing_path("cluttered-fashion", path)
    items, labels = load_idx_split(path, split, split_seed, val_size=FASHION_VAL_SIZE)
    return ClutteredDataset(items, labels, split, seed, kind="cluttered-fashion",
                            class_names=FASHION_CLASSES, **kw)
