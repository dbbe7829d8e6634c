"""Image files in folders or zips: CIFAR-10 (`<root>/<split>/<class>/*.jpg`) and ImageNet
style folders (`DIR/<class>/*.JPEG`, `DIR/<split>/<class>/*`, or a flat folder with
`labels.tsv`).

Items are decoded lazily with `load_image`. A zip is never extracted: each worker process
opens its own `ZipFile` on first use (a handle shared across a fork would interleave
seeks), and pickling drops the handle so spawned workers reopen it too.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import (DataError, DataInfo, SkipBadMixin, carve_split, check_split, existing_path, normalize,
                   read_table)
from .images import FILTERS, ImageError, load_image, resize_center_crop, to_tensor

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                        ".ppm", ".pgm", ".pbm", ".pnm"})

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VAL_FRACTION = 0.1  # share of a training set carved out as "val" when no val folder exists


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTS


class ImageFileDataset(SkipBadMixin, Dataset):
    """Labelled image files, from a directory tree or members of one zip file."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], info: DataInfo,
                 zip_path: Optional[str] = None, crop_pct: float = 1.0, skip_bad: bool = False,
                 interpolation: str = "bicubic", crop_mode: str = "center"):
        """
        Args:
            files: file paths, or member names of `zip_path`.
            labels: class index of each file.
            info: the data set's `DataInfo` (mode, size and normalisation come from it).
            zip_path: read `files` from this zip instead of the file system.
            crop_pct, interpolation, crop_mode: see `resize_center_crop`; applied only to
                images not already `img_size`.
            skip_bad: replace undecodable files by the next good one (with a warning).
        """
        if interpolation not in FILTERS or crop_mode not in ("center", "squash"):
            raise DataError(f"{info.kind}: unknown interpolation {interpolation!r} or crop mode {crop_mode!r} "
                            f"(interpolations: {', '.join(FILTERS)}; crop modes: center, squash)")
        if len(files) == 0:
            raise DataError(f"{info.kind}: no images found")
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.info = info
        self.zip_path = zip_path
        self.crop_pct = crop_pct
        self.interpolation, self.crop_mode = interpolation, crop_mode
        self.skip_bad = skip_bad
        self._zf: Optional[zipfile.ZipFile] = None
        self._zf_pid = -1

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_zf"], state["_zf_pid"] = None, -1
        return state

    def source_name(self, index: int) -> str:
        return f"{self.zip_path}:{self.files[index]}" if self.zip_path else self.files[index]

    def _zip(self) -> zipfile.ZipFile:
        if self._zf is None or self._zf_pid != os.getpid():
            self._zf, self._zf_pid = zipfile.ZipFile(self.zip_path), os.getpid()
        return self._zf

    def _read(self, index: int) -> Any:
        if self.zip_path is None:
            return self.files[index]
        try:
            return self._zip().read(self.files[index])
        except (zipfile.BadZipFile, zlib.error, OSError, KeyError, EOFError) as e:
            raise ImageError(f"cannot read {self.source_name(index)}: {e}") from None

    def _load(self, index: int) -> dict[str, Any]:
        mode = "L" if self.info.in_chans == 1 else "RGB"
        img = load_image(self._read(index), mode=mode, name=self.source_name(index))
        h, w = self.info.img_size
        if img.size != (w, h):
            img = resize_center_crop(img, (h, w), self.crop_pct, self.interpolation, self.crop_mode)
        x = normalize(to_tensor(img), self.info.mean, self.info.std)
        return {"image": x, "label": int(self.labels[index])}


# ---------------------------------------------------------------------------- CIFAR-10


def _split_dir_name(split: str) -> str:
    return "test" if split == "test" else "train"  # val is carved from train


def _entries_from_zip(zip_path: Path, split_dir: str) -> list[tuple[str, str]]:
    """(member, class) of every image at `.../<split_dir>/<class>/<file>` in the zip."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"cannot read zip {zip_path}: {e}") from None
    out = []
    for name in names:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-3] == split_dir and _is_image_name(name):
            out.append((name, parts[-2]))
    return sorted(out)


def _entries_from_class_dirs(root: Path) -> list[tuple[str, str]]:
    """(path, class) of every image in `root/<class>/` (sorted)."""
    out = []
    for cls in sorted(d for d in os.listdir(root) if (root / d).is_dir() and not d.startswith(".")):
        for f in sorted(os.listdir(root / cls)):
            if _is_image_name(f) and (root / cls / f).is_file():
                out.append((str(root / cls / f), cls))
    return out


def _find_cifar_entries(path: Path, split_dir: str) -> tuple[list[tuple[str, str]], Optional[str]]:
    """Find the images of `split_dir` under a folder or zip; returns (entries, zip or None)."""
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(f"cifar10: {path} is neither a folder nor a zip file")
        entries = _entries_from_zip(path, split_dir)
        if not entries:
            raise DataError(f"cifar10: no '{split_dir}/<class>/<image>' entries in {path}")
        return entries, str(path)
    # A folder: the split folder directly inside it or one level down, else zips in it.
    for cand in [path / split_dir] + [d / split_dir for d in sorted(path.iterdir()) if d.is_dir()]:
        if cand.is_dir():
            entries = _entries_from_class_dirs(cand)
            if entries:
                return entries, None
    zips = sorted(path.glob("*.zip"), key=lambda z: (split_dir not in z.name, z.name))
    for z in zips:
        entries = _entries_from_zip(z, split_dir)
        if entries:
            return entries, str(z)
    raise DataError(f"cifar10: no '{split_dir}' split in {path} "
                    f"(expected {split_dir}/<class>/*.jpg in the folder or in a zip there)")


def cifar10(path: str, split: str = "train", split_seed: int = 0, img_size: Optional[int] = None,
            mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
            skip_bad: bool = False, val_fraction: float = VAL_FRACTION) -> ImageFileDataset:
    """CIFAR-10 (or any `<split>/<class>/` image set) from a folder or a zip.

    Args:
        path: a zip, a folder holding `<split>/<class>/` (possibly one level down), or a
            folder holding zips of that layout (e.g. `cifar10_jpg_{train,test}.zip`).
        split: "train", "val" (deterministic `val_fraction` of train) or "test".
        split_seed: seed of the train/val partition.
        img_size: side of the returned images (default 32; others are resized/cropped).
        mean, std: normalisation (default: CIFAR-10's; the shared pretrained tiny ViT was
            trained on raw [0, 1] pixels, i.e. mean (0, 0, 0), std (1, 1, 1)).
        skip_bad: replace undecodable files by the next good one (with a warning).
        val_fraction: share of train held out as "val".

    Returns:
        An `ImageFileDataset`.
    """
    check_split(split)
    p = existing_path("cifar10", path, folder=False)  # a zip or a folder
    entries, zip_path = _find_cifar_entries(p, _split_dir_name(split))
    class_names = tuple(sorted({c for _, c in entries}))
    if split != "test":
        keep = carve_split(len(entries), split, split_seed, round(val_fraction * len(entries)))
        entries = [entries[i] for i in keep]
    index = {c: i for i, c in enumerate(class_names)}
    side = img_size or 32
    info = DataInfo(kind="cifar10", num_classes=len(class_names), class_names=class_names,
                    in_chans=3, img_size=(side, side),
                    mean=tuple(mean) if mean is not None else CIFAR10_MEAN,
                    std=tuple(std) if std is not None else CIFAR10_STD, has_masks=False)
    return ImageFileDataset([f for f, _ in entries], [index[c] for _, c in entries], info,
                            zip_path=zip_path, crop_pct=1.0, skip_bad=skip_bad)


# ------------------------------------------------------------------------- imagefolder


def _read_synsets(path: Path) -> tuple[list[str], list[str]]:
    """wnids and short names from a `synset_words.txt` ("n01440764 tench, Tinca tinca")."""
    wnids, names = [], []
    for line in ("\t".join(r) for r in read_table(path, "imagefolder: ")):
        if line.strip():
            wnid, _, text = line.strip().partition(" ")
            wnids.append(wnid)
            names.append(text.split(",")[0].strip() or wnid)
    return wnids, names


def _read_labels_tsv(root: Path) -> tuple[list[tuple[str, int]], tuple[str, ...], bool]:
    """Entries and class names of a flat folder described by `labels.tsv`.

    Each row is `file<TAB>class` with `file` relative to the folder; `class` is an index
    (names then come from `synset_words.txt` next to it, if present) or a class name.
    A first row whose class column is not an integer and names a column ("class...") is
    taken as the header. The third value says whether the classes were given as indices.
    """
    rows = []
    for n, row in enumerate(read_table(root / "labels.tsv", "imagefolder: "), start=1):
        if not any(c.strip() for c in row):
            continue  # blank line
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"imagefolder: {root / 'labels.tsv'} line {n}: expected file<TAB>class, got {row!r}")
        rows.append((row[0].strip(), row[1].strip()))
    if rows and not rows[0][1].lstrip("-").isdigit() and rows[0][1].lower().startswith("class"):
        rows = rows[1:]
    if not rows:
        raise DataError(f"imagefolder: {root / 'labels.tsv'} lists no files")
    synsets = root / "synset_words.txt"
    if any(c.lstrip("-").isdigit() for _, c in rows) and not all(c.isdigit() for _, c in rows):
        bad = next(c for _, c in rows if not c.isdigit())
        raise DataError(f"imagefolder: {root / 'labels.tsv'} mixes class indices and names ({bad!r}); "
                        "use non-negative indices or names throughout")
    if all(c.isdigit() for _, c in rows):
        labels = [int(c) for _, c in rows]
        _check_index(max(labels), root / "labels.tsv")
        if synsets.is_file():
            names = tuple(_read_synsets(synsets)[1])
        else:
            names = tuple(str(i) for i in range(max(labels) + 1))
        if max(labels) >= len(names):
            raise DataError(f"imagefolder: label {max(labels)} in labels.tsv but only {len(names)} classes")
    else:
        names = tuple(sorted({c for _, c in rows}))
        labels = [names.index(c) for _, c in rows]
        return [(str(root / f), y) for (f, _), y in zip(rows, labels)], names, False
    return [(str(root / f), y) for (f, _), y in zip(rows, labels)], names, True


def _unlabeled(root: Path) -> bool:
    """A folder of images with no class subfolders."""
    subdirs = any((root / d).is_dir() and not d.startswith(".") for d in os.listdir(root))
    return not subdirs and any(_is_image_name(f) for f in os.listdir(root))


def _class_dir_entries(root: Path, classes: Sequence[str], index: Optional[dict[str, int]] = None) -> list[tuple[str, int]]:
    index = index if index is not None else {c: i for i, c in enumerate(classes)}
    return [(f, index[c]) for f, c in _entries_from_class_dirs(root) if c in index]


MAX_CLASS_INDEX = 10 ** 6  # far above any classifier head; a larger index is a typo, not a class


def _check_index(i: int, path: Path) -> None:
    # Class names are listed up to the largest index: an index like 4777777799 (found by
    # fuzzing) would allocate billions of them.
    if i > MAX_CLASS_INDEX:
        raise DataError(f"imagefolder: class index {i} in {path} is larger than {MAX_CLASS_INDEX}")


def _read_classes_tsv(path: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """Folder name -> class index, and class names by index, from a `classes.tsv`.

    Columns (tab-separated, with a header): the folder name (`wnid`), its index into the
    model's classes (`class_index`) and optionally a `name`, as Imagenette ships:
    `n01440764<TAB>0<TAB>tench, Tinca tinca`.
    """
    rows = [r for r in read_table(path, "imagefolder: ") if r and any(c.strip() for c in r)]
    if not rows or len(rows[0]) < 2:
        raise DataError(f"imagefolder: {path} needs a header and rows of folder<TAB>class_index")
    index: dict[str, int] = {}
    names: dict[int, str] = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[1].strip().isdigit():
            raise DataError(f"imagefolder: {path} line {n}: expected folder<TAB>class_index, got {row!r}")
        i = int(row[1])
        _check_index(i, path)
        index[row[0].strip()] = i
        names[i] = (row[2].split(",")[0].strip() if len(row) > 2 and row[2].strip() else row[0].strip())
    size = max(names) + 1
    return index, tuple(names.get(i, str(i)) for i in range(size))


def imagefolder(path: str, split: str = "test", split_seed: int = 0, img_size: int = 224,
                crop_pct: float = 0.875, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD, skip_bad: bool = False,
                val_fraction: float = VAL_FRACTION, interpolation: str = "bicubic",
                crop_mode: str = "center") -> ImageFileDataset:
    """An ImageNet-style folder of real photos, resized and centre-cropped.

    Layouts, tried in this order:
      * `DIR/labels.tsv` (flat folder; see `_read_labels_tsv`),
      * `DIR/{train,val,test}/<class>/*` (split folders; class indices from `train/` when
        present; without `val/`, "train" and "val" are carved from `train/`),
      * `DIR/<class>/*` (one set),
      * `DIR/*` (images without classes: label -1, no classes; for label-free training
        and segmentation).
    Class folders are numbered in sorted order, unless `DIR/classes.tsv` maps each folder to
    its index into the model's classes (`_read_classes_tsv`; Imagenette's ten ImageNet
    classes keep their ImageNet-1k indices). Indices from `labels.tsv` or `classes.tsv`
    index a model's head, which may have more classes than the folder holds.
    Without split folders the whole folder is "test", and "train"/"val" are a
    deterministic (1 - val_fraction, val_fraction) partition of it.

    Args:
        path: the folder.
        split: "train", "val" or "test".
        split_seed: seed of any carved train/val partition.
        img_size: side of the square output.
        crop_pct: resize the shorter side to img_size / crop_pct, then centre-crop.
        mean, std: normalisation (ImageNet's by default).
        interpolation, crop_mode: see `resize_center_crop`.
        skip_bad: replace undecodable files by the next good one (with a warning).
        val_fraction: share carved out as "val" when there is no `val/` folder.

    Returns:
        An `ImageFileDataset`, labelled as described above.
    """
    check_split(split)
    root = existing_path("imagefolder", path)
    carve, indexed = False, False
    index = None
    if (root / "classes.tsv").is_file():
        index, indexed_names = _read_classes_tsv(root / "classes.tsv")
    if (root / "labels.tsv").is_file():
        entries, names, indexed = _read_labels_tsv(root)
        carve = split != "test"
    elif any((root / s).is_dir() for s in ("train", "val", "test")):
        ref = root / "train" if (root / "train").is_dir() else root / split
        if not ref.is_dir():
            raise DataError(f"imagefolder: no {split}/ folder in {path}")
        names = tuple(sorted(d for d in os.listdir(ref) if (ref / d).is_dir() and not d.startswith(".")))
        # Without a val/ folder, train and val are both carved from train/ so they stay disjoint.
        carve = split in ("train", "val") and not (root / "val").is_dir()
        source = root / ("train" if carve else split)
        if not source.is_dir():
            raise DataError(f"imagefolder: no {split}/ folder in {path}")
        entries = _class_dir_entries(source, names, index)
    elif _unlabeled(root):
        # Images straight in the folder: no classes; label -1 (for `iared train --target agreement`,
        # which labels them by the backbone, and for segmentation).
        names, indexed, carve = (), True, split != "test"
        entries = [(str(root / f), -1) for f in sorted(os.listdir(root)) if _is_image_name(f)]
    else:
        names = tuple(sorted(d for d in os.listdir(root) if (root / d).is_dir() and not d.startswith(".")))
        entries = _class_dir_entries(root, names, index)
        carve = split != "test"
        synsets = root / "synset_words.txt"
        if synsets.is_file():  # show "tench" rather than "n01440764"
            lookup = dict(zip(*_read_synsets(synsets)))
            names = tuple(lookup.get(n, n) for n in names)
    if index is not None and not (root / "labels.tsv").is_file():
        names, indexed = indexed_names, True
    if not entries:
        raise DataError(f"imagefolder: no images found in {path}")
    if carve:
        keep = carve_split(len(entries), split, split_seed, round(val_fraction * len(entries)))
        entries = [entries[i] for i in keep]
    info = DataInfo(kind="imagefolder", num_classes=len(names), class_names=tuple(names), in_chans=3,
                    img_size=(img_size, img_size), mean=tuple(mean), std=tuple(std), has_masks=False,
                    indexed=indexed)
    return ImageFileDataset([f for f, _ in entries], [y for _, y in entries], info, crop_pct=crop_pct,
                            skip_bad=skip_bad, interpolation=interpolation, crop_mode=crop_mode)


# ---------------------------------------------------------------------- images with masks


class SegFileDataset(ImageFileDataset):
    """Image files with binary foreground masks, both through the same resize and crop."""

    def __init__(self, files: Sequence[str], masks: Sequence[str], labels: Sequence[int], info: DataInfo, **kw: Any):
        super().__init__(files, labels, info, **kw)
        self.masks = list(masks)

    def _load(self, index: int) -> dict[str, Any]:
        item = super()._load(index)
        m = load_image(self.masks[index], mode="L", name=self.masks[index])
        h, w = self.info.img_size
        if m.size != (w, h):
            # Nearest neighbour keeps the mask binary; the geometry is the image's.
            m = resize_center_crop(m, (h, w), self.crop_pct, "nearest", self.crop_mode)
        return {**item, "mask": torch.from_numpy(np.asarray(m) > 0)}


def segfolder(path: str, split: str = "test", split_seed: int = 0, img_size: int = 224, crop_pct: float = 0.875,
              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, skip_bad: bool = False,
              val_fraction: float = VAL_FRACTION, interpolation: str = "bicubic",
              crop_mode: str = "center") -> SegFileDataset:
    """Photos with binary foreground masks, listed in `DIR/masks.tsv`.

    `masks.tsv` is tab-separated with a header naming at least the columns `image` and
    `mask` (paths relative to DIR; other columns are ignored, a `label` column gives class
    indices of the model's head). A mask is an image in which any non-zero pixel is
    foreground; it goes through the image's resize and crop (nearest neighbour), so it
    covers exactly the pixels the model sees. The whole list is "test"; "train"/"val" are
    a deterministic partition of it. Without a `label` column the labels are -1
    (segmentation needs none: GradCAM and Chefer's relevance explain the predicted class).

    Args: as `imagefolder`.
    """
    check_split(split)
    root = Path(path)
    table = root / "masks.tsv"
    if not table.is_file():
        raise DataError(f"segfolder: no masks.tsv in {path}")
    rows = read_table(table, "segfolder: ")
    if not rows or "image" not in rows[0] or "mask" not in rows[0]:
        raise DataError(f"segfolder: {table} needs a header with the columns image and mask")
    header, body = rows[0], rows[1:]
    col = {name: header.index(name) for name in ("image", "mask", "label") if name in header}
    files, masks, labels = [], [], []
    for n, row in enumerate(body, start=2):
        if len(row) <= max(col["image"], col["mask"]):
            raise DataError(f"segfolder: {table} line {n} has no image and mask")
        files.append(str(root / row[col["image"]]))
        masks.append(str(root / row[col["mask"]]))
        if "label" in col:
            try:
                labels.append(int(row[col["label"]]))
            except (ValueError, IndexError):
                raise DataError(f"segfolder: {table} line {n}: label is not a class index") from None
            _check_index(labels[-1], table)
        else:
            labels.append(-1)
    if not files:
        raise DataError(f"segfolder: {table} lists no images")
    if split != "test":
        keep = carve_split(len(files), split, split_seed, round(val_fraction * len(files)))
        files, masks, labels = ([v[i] for i in keep] for v in (files, masks, labels))
    n_classes = max(labels) + 1 if "label" in col else 0
    info = DataInfo(kind="segfolder", num_classes=n_classes, class_names=tuple(str(i) for i in range(n_classes)),
                    in_chans=3, img_size=(img_size, img_size), mean=tuple(mean), std=tuple(std), has_masks=True,
                    indexed=True)
    return SegFileDataset(files, masks, labels, info, crop_pct=crop_pct, skip_bad=skip_bad,
                          interpolation=interpolation, crop_mode=crop_mode)
