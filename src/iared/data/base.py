"""What every data set shares: its `DataInfo`, the `DataError`, deterministic splits, and
the rule that one bad file never kills a long run silently.

A data set is a `torch.utils.data.Dataset` whose items are dicts
`{"image": float (C, H, W) normalised, "label": int, "mask": bool (H, W)}` ("mask" only
where the data has masks) and which carries a `DataInfo` at `.info`.
"""

from __future__ import annotations

from pathlib import Path

import abc
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DataError(UserError):
    """A user-facing data problem (bad spec, missing file, empty folder); one-line message.

    A `UserError` (hence a `ValueError`): the CLI prints it as one line, exit code 2.
    """


class ImageError(DataError):
    """An image that cannot be used (missing, empty, not an image, truncated, too large)."""


@dataclass(frozen=True)
class DataInfo:
    """What a model and an evaluator need to know about a data set."""

    kind: str                       # the spec's KIND, e.g. "cluttered-fashion"
    num_classes: int                # size of the classifier head
    class_names: tuple[str, ...]    # human-readable, index = label
    in_chans: int                   # 1 (grayscale) or 3 (RGB)
    img_size: tuple[int, int]       # (H, W) of every image tensor
    mean: tuple[float, ...]         # per-channel mean subtracted from [0, 1] pixels
    std: tuple[float, ...]          # per-channel std the centred pixels are divided by
    has_masks: bool                 # items carry a "mask" (foreground pixels) for segmentation
    indexed: bool = False           # labels are given indices into a model's classes (labels.tsv,
                                    # classes.tsv): a head with more classes than the data is fine


def read_table(path, what: str = "") -> list[list[str]]:
    """The rows of a tab-separated UTF-8 text file (`labels.tsv`, `classes.tsv`, ...).

    Raises:
        DataError: unreadable, not UTF-8 text, or not a table (e.g. NUL bytes), naming the file.
    """
    import csv
    import io

    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{what}{path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{what}cannot read {path}: {e.strerror or e}") from None
    try:
        return list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
    except csv.Error as e:
        raise DataError(f"{what}{path} is not a tab-separated table: {e}") from None


def check_split(split: str) -> str:
    """Return `split` if it is one of train/val/test, else raise `DataError`."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


def existing_path(kind: str, path: Union[str, Path], folder: bool = True) -> Path:
    """`path` as a `Path` if it exists (and is a folder, with `folder`), else a `DataError`."""
    p = Path(path)
    if folder and not p.is_dir():
        raise DataError(f"{kind}: not a directory: {path}")
    if not p.exists():
        raise DataError(f"{kind}: path does not exist: {path}")
    return p


def carve_split(n: int, split: str, seed: int, val_size: int) -> np.ndarray:
    """Indices of a deterministic train/val partition of `n` training items.

    The permutation depends only on (n, seed), so "train" and "val" built with the same
    seed are disjoint and together cover `range(n)`; each is returned sorted so reads
    from a file stay in file order.

    Args:
        n: number of items in the source training set.
        split: "train" or "val".
        seed: permutation seed.
        val_size: how many items go to "val" (clipped to [0, n]).

    Returns:
        int64 array of source indices.
    """
    if split not in ("train", "val"):
        raise DataError(f"carve_split handles train/val, not {split!r}")
    val_size = max(0, min(int(val_size), n))
    # A fixed extra word keeps this permutation independent of other uses of `seed`.
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    chosen = perm[:val_size] if split == "val" else perm[val_size:]
    return np.sort(chosen).astype(np.int64)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel for a (C, H, W) float tensor in [0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


class SkipBadMixin(abc.ABC):
    """Per-item loading that reports or skips undecodable files.

    Subclasses implement `_load(index) -> dict` (raising `ImageError` for a bad file) and
    `source_name(index) -> str`. With `skip_bad=False` (default) the error propagates, so
    a run stops naming the file; with `skip_bad=True` a warning names the file once and
    the next good item (cyclically) is returned instead.
    """

    skip_bad: bool = False

    @abc.abstractmethod
    def _load(self, index: int) -> dict[str, Any]:
        """Item `index` as a dict; raises `ImageError` for a bad file."""

    @abc.abstractmethod
    def source_name(self, index: int) -> str:
        """A name for item `index` that a person can find (a path, a zip member)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)  # type: ignore[arg-type]
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        if not self.skip_bad:
            return self._load(index)
        bad = self.__dict__.setdefault("_bad", set())
        for step in range(n):
            i = (index + step) % n
            if i in bad:
                continue
            try:
                return self._load(i)
            except ImageError as e:
                bad.add(i)
                log.warning("skipping bad file (item %d): %s", i, e)
        raise DataError(f"every file of this data set failed to load (first: {self.source_name(index)})")


def scan(dataset: Dataset, limit: Optional[int] = None) -> list[tuple[int, str, str]]:
    """Decode every item up front and list the ones that fail.

    Args:
        dataset: a data set from this package (anything with `_load`, or any Dataset).
        limit: scan only the first `limit` items.

    Returns:
        (index, source name, error message) for each bad item; empty when all load.
    """
    load = getattr(dataset, "_load", dataset.__getitem__)
    name = getattr(dataset, "source_name", lambda i: f"item {i}")
    n = len(dataset)  # type: ignore[arg-type]
    if limit is not None:
        n = min(n, limit)
    bad = []
    for i in range(n):
        try:
            load(i)
        except ImageError as e:
            bad.append((i, name(i), str(e)))
    return bad

