"""Data sets by name: `build_dataset("cluttered-fashion:/path", "train")`.

A data spec is `KIND[:PATH]`. Each kind maps to a builder in `DATASETS`; another module
(the video data sets) adds its kinds with `register_dataset`. Every data set returns dict
items `{"image", "label"[, "mask"]}` and carries a `DataInfo` at `.info`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch.utils.data import Dataset

from .base import DataError, DataInfo, SPLITS, carve_split, check_split, scan
from .cluttered import ClutteredDataset, cluttered_digits, cluttered_fashion, measure_stats
from .folders import ImageFileDataset, cifar10, imagefolder, segfolder
from .idx import IdxDataset, default_fashion_dir, read_idx
from .images import ImageError, load_image

# builder(path or None, split, seed, **kw) -> Dataset. `seed` drives generated data
# (clutter, positions); train/val partitions use `split_seed` (default 0) so that a new
# run seed never moves held-out items into training.
Builder = Callable[..., Dataset]
DATASETS: dict[str, Builder] = {}
# The preprocessing options (`iared.preprocess.loader_options`) each kind's builder takes.
PREPROCESS_OPTIONS: dict[str, frozenset[str]] = {}
NORMALISATION = frozenset({"mean", "std"})
PHOTO_OPTIONS = frozenset({"img_size", "mean", "std", "crop_pct", "interpolation", "crop_mode"})


def register_dataset(kind: str, builder: Builder, preprocess: frozenset[str] = frozenset()) -> None:
    """Make `kind` available to `build_dataset` (e.g. from the video data module).

    `preprocess` names the options of `iared.preprocess.loader_options` the builder takes:
    a model's recipe is applied only where it means something (a photo folder is resized
    and normalised as the model wants; generated data keeps its size).
    """
    DATASETS[kind] = builder
    PREPROCESS_OPTIONS[kind] = frozenset(preprocess)


def parse_data_spec(spec: str) -> tuple[str, Optional[str]]:
    """Split `KIND[:PATH]` into (kind, path or None).

    Raises:
        DataError: empty kind, or a colon with nothing after it.
    """
    kind, sep, path = spec.strip().partition(":")
    kind = kind.strip().lower()
    if not kind:
        raise DataError(f"bad data spec {spec!r}: expected KIND[:PATH]")
    if sep and not path.strip():
        raise DataError(f"bad data spec {spec!r}: empty path after ':'")
    return kind, (path.strip() or None)


def build_dataset(spec: str, split: str, seed: int = 0, preprocess: Optional[dict[str, Any]] = None,
                  **kw: Any) -> Dataset:
    """Build the data set a spec names.

    Args:
        spec: `KIND[:PATH]`, e.g. "cluttered-digits", "cifar10:/data/cifar10_jpg".
        split: "train", "val" or "test".
        seed: seed of generated data (clutter); ignored by file-based kinds.
        preprocess: a model's `pretrained_cfg` (see `iared.preprocess`): the options of it
            this kind takes are applied; `kw` overrides them.
        **kw: options of the kind's builder (e.g. img_size, skip_bad, canvas_size).

    Returns:
        A Dataset with `.info`.

    Raises:
        DataError: unknown kind, missing or empty path, missing files (one-line message).
    """
    kind, path = parse_data_spec(spec)
    check_split(split)
    if kind not in DATASETS:
        raise DataError(f"unknown data kind {kind!r}: expected one of {', '.join(sorted(DATASETS))}")
    if preprocess:
        from ..preprocess import PreprocessError, loader_options

        try:
            options = loader_options(preprocess)
        except PreprocessError as e:
            raise DataError(str(e)) from None
        accepted = PREPROCESS_OPTIONS.get(kind, frozenset())
        given = {k: v for k, v in kw.items() if v is not None or k not in options}  # None: not given
        kw = {**{k: v for k, v in options.items() if k in accepted}, **given}
    std = kw.get("std")
    if std is not None and not all(s > 0 for s in std):
        raise DataError(f"std must be positive, got {tuple(std)}")
    ds = DATASETS[kind](path, split, seed, **kw)
    channels = getattr(getattr(ds, "info", None), "in_chans", None)  # a user's kind may not say
    for name in ("mean", "std"):
        if channels is not None and kw.get(name) is not None and len(kw[name]) not in (1, channels):
            # one value per channel (or one for all); anything else would broadcast the
            # images to another number of channels
            raise DataError(f"{name} has {len(kw[name])} values; {kind} images have {channels} channel(s)")
    return ds


def _needs_path(kind: str, path: Optional[str], what: str) -> str:
    if not path:
        raise DataError(f"{kind} needs a path: use {kind}:{what}")
    return path


def _no_path(kind: str, path: Optional[str]) -> None:
    if path:
        raise DataError(f"{kind} takes no path (got {path!r})")


def _build_cluttered_digits(path, split, seed, **kw):
    _no_path("cluttered-digits", path)
    return cluttered_digits(split, seed, **kw)


def _build_cluttered_fashion(path, split, seed, **kw):
    return cluttered_fashion(path, split, seed, **kw)


def _build_mnist(path, split, seed, **kw):
    return IdxDataset(_needs_path("mnist", path, "DIR"), split, kind="mnist", **kw)


def _build_fashion_mnist(path, split, seed, **kw):
    path = path or default_fashion_dir()
    if not path:
        raise DataError("fashion-mnist needs a path: use fashion-mnist:DIR "
                        "(or install the Debian package dataset-fashion-mnist)")
    return IdxDataset(path, split, kind="fashion-mnist", **kw)


def _build_cifar10(path, split, seed, **kw):
    return cifar10(_needs_path("cifar10", path, "PATH (folder or zip)"), split, **kw)


def _build_imagefolder(path, split, seed, **kw):
    return imagefolder(_needs_path("imagefolder", path, "DIR"), split, **kw)


def _build_segfolder(path, split, seed, **kw):
    return segfolder(_needs_path("segfolder", path, "DIR"), split, **kw)


register_dataset("cluttered-digits", _build_cluttered_digits, NORMALISATION)
register_dataset("cluttered-fashion", _build_cluttered_fashion, NORMALISATION)
register_dataset("mnist", _build_mnist, NORMALISATION)
register_dataset("fashion-mnist", _build_fashion_mnist, NORMALISATION)
register_dataset("cifar10", _build_cifar10, NORMALISATION)
register_dataset("imagefolder", _build_imagefolder, PHOTO_OPTIONS)
register_dataset("segfolder", _build_segfolder, PHOTO_OPTIONS)

from .video import build_moving_fashion, build_videofolder  # noqa: E402  (video kinds)

register_dataset("moving-fashion", build_moving_fashion, NORMALISATION)
register_dataset("videofolder", build_videofolder, NORMALISATION)

__all__ = [
    "DATASETS", "PREPROCESS_OPTIONS", "SPLITS", "ClutteredDataset", "DataError", "DataInfo", "IdxDataset", "ImageError",
    "ImageFileDataset", "build_dataset", "carve_split", "check_split", "cifar10", "cluttered_digits",
    "cluttered_fashion", "imagefolder", "load_image", "measure_stats", "parse_data_spec", "read_idx",
    "register_dataset", "scan",
]
