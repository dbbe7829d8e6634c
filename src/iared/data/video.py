"""Video data: the generated `moving-fashion` clips and `videofolder` (real files via PyAV).

Items are dicts `{"video": float (C, T, H, W) normalised, "label": int[, "mask": bool
(T, H, W)]}`; one-view items also carry the same tensor as "image", the model-input key
the shared training and evaluation loops read (`iared.training.loop`). With `views=3` (the paper's video-1 protocol: left, centre, right crops of
the same clip) "video" is (3, C, T, H, W) and "mask" (3, T, H, W), views in that order,
so `evaluation.video` can score the centre view alone (clip-1) and the three together
(video-1) from one item.

Both kinds crop square views of side `img_size` along the longer side of a wider frame,
as the 3-crop test of SlowFast/TimeSformer does (shorter side resized to the crop size).

moving-fashion
    A Fashion-MNIST item (downscaled to `item_size`) moves in a straight line across a
    48 x 64 canvas over 8 frames, on static clutter cut from other items. The label is
    the motion's speed: still, slow, medium or fast (`SPEEDS`), in a direction drawn at
    random (up, down, left or right: a nuisance, like the item itself). The item is the
    split's item `index` whatever the label, so appearance carries no information about
    the class; the class is how far the item travels between frames. (Direction as the
    class was tried first, 4 directions x 2 speeds: a small JointST trained from scratch
    on CPU learns the speed within a few hundred steps but stays at chance on the
    direction for thousands, so the 90-minute budget of Table 3 would measure an
    untrained backbone.) The trajectory stays inside the centre crop, so the centre view always
    sees the whole item; side views may cut it. Every clip is a pure function of
    (seed, split, epoch, index); per-frame masks mark the item's pixels.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import UserError
from .base import DataError, DataInfo, check_split, existing_path, read_table
from .idx import default_fashion_dir, load_idx_split


class VideoError(DataError, UserError):
    """A video file that cannot be decoded or is too short; the message names the file."""


@dataclass(frozen=True)
class VideoDataInfo(DataInfo):
    """`DataInfo` plus what a video model needs: frames per clip and views per item."""

    num_frames: int = 8   # T, frames per clip
    views: int = 1        # 1: one crop per item; 3: left, centre, right crops stacked


# ----------------------------------------------------------------------------- crops

VIEW_NAMES = ("left", "center", "right")


def crop_offsets(length: int, size: int, views: int) -> list[int]:
    """Start offsets of `views` crops of `size` along an axis of `length`.

    views=1: the centre crop; views=3: left/top, centre, right/bottom (SlowFast's 3-crop).
    """
    if size > length:
        raise ValueError(f"crop {size} larger than the frame side {length}")
    centre = (length - size) // 2
    if views == 1:
        return [centre]
    if views == 3:
        return [0, centre, length - size]
    raise ValueError(f"views must be 1 or 3, got {views}")


def spatial_crops(video: Tensor, size: int, views: int = 3, offset: Optional[int] = None) -> Tensor:
    """Square crops of side `size` along the longer spatial side of (..., T, H, W).

    Args:
        video: (..., T, H, W) with min(H, W) == size (resize the shorter side first).
        size: crop side.
        views: 1 (centre) or 3 (left, centre, right; top, centre, bottom for tall frames).
        offset: with views=1, crop at this offset instead of the centre (training jitter).

    Returns:
        (views, ..., T, size, size).
    """
    H, W = video.shape[-2:]
    if min(H, W) != size:
        raise ValueError(f"frames {H}x{W}: the shorter side must equal the crop size {size}")
    along_w = W >= H
    length = W if along_w else H
    offs = [offset] if (offset is not None and views == 1) else crop_offsets(length, size, views)
    crops = [video[..., :, o:o + size] if along_w else video[..., o:o + size, :] for o in offs]
    return torch.stack(crops)


# --------------------------------------------------------------------- moving-fashion

# The classes: speed in pixels per frame. The direction (unit step in (dy, dx)) is drawn
# at random per clip and is not part of the label.
SPEEDS = {"still": 0.0, "slow": 1.25, "medium": 2.5, "fast": 3.75}
MOTION_NAMES = tuple(SPEEDS)
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
_STEPS = tuple(DIRECTIONS.values())

MF_MASK_THRESHOLD = 25       # uint8 item intensity above which a pixel belongs to the item
MF_VAL_SIZE = 5000           # Fashion-MNIST training items held out as "val"
# Pixel mean/std in [0, 1] of the default configuration, measured with `measure_video_stats`
# over the first 500 train clips (seed 0); tests/data/test_video.py re-measures them.
MF_DEFAULT_STATS = ((0.108,), (0.249,))

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def trajectory(start: tuple[int, int], direction: tuple[int, int], speed: float, num_frames: int) -> np.ndarray:
    """(T, 2) integer top-left (y, x) of the item in each frame: `speed` px per frame along `direction`."""
    (dy, dx), v = direction, speed
    t = np.arange(num_frames)
    steps = np.round(v * t).astype(np.int64)
    return np.stack([start[0] + dy * steps, start[1] + dx * steps], axis=1)


class MovingFashionDataset(Dataset):
    """Fashion-MNIST items moving over static clutter; label = speed of the motion (4 classes).

    Args:
        items: (N, h, w) uint8 source items of this split (N >= 2).
        split: "train", "val" or "test".
        seed: generation seed.
        num_frames: T.
        img_size: side of the square view fed to the model (= canvas height).
        canvas_width: width of the full canvas (>= img_size); views are crops of it.
        item_size: side the 28x28 items are resized to.
        num_fragments: static clutter fragments per clip.
        fragment_size: side of each fragment.
        views: 1 (one crop: random offset on train, centre otherwise) or 3 (left, centre, right).
        limit: use only the first `limit` items (small runs).
        mean, std: normalisation (default: `MF_DEFAULT_STATS`).
    """

    def __init__(self, items: np.ndarray, split: str, seed: int = 0, num_frames: int = 8, img_size: int = 48,
                 canvas_width: int = 64, item_size: int = 20, num_fragments: int = 8, fragment_size: int = 8,
                 views: int = 1, limit: Optional[int] = None,
                 mean: Sequence[float] = MF_DEFAULT_STATS[0], std: Sequence[float] = MF_DEFAULT_STATS[1]):
        check_split(split)
        items = np.asarray(items, dtype=np.uint8)
        if items.ndim != 3 or len(items) < 2:
            raise DataError(f"moving-fashion: need at least 2 source items, got {items.shape}")
        if limit is not None:
            items = items[:max(2, int(limit))]
        items = resize_items(items, item_size)
        self.items = items
        self.split, self.seed, self.epoch = split, int(seed), 0
        self.num_frames, self.img_size, self.canvas_width = num_frames, img_size, canvas_width
        self.item_size, self.num_fragments, self.fragment_size = item_size, num_fragments, fragment_size
        self.views = views
        crop_offsets(canvas_width, img_size, views)  # validates views and sizes
        travel = int(math.ceil(max(SPEEDS.values()) * (num_frames - 1)))
        # The trajectory must fit in the centre crop (x) and the canvas height (y).
        self._centre_x = (canvas_width - img_size) // 2
        self._room = img_size - item_size - travel
        if self._room < 0:
            raise DataError(f"moving-fashion: an item of {item_size} moving {travel} px does not fit "
                            f"in a {img_size} px view")
        if not 0 < fragment_size <= item_size:
            raise DataError(f"moving-fashion: fragment size must be in [1, {item_size}]")
        self.info = VideoDataInfo(kind="moving-fashion", num_classes=len(MOTION_NAMES), class_names=MOTION_NAMES,
                                  in_chans=1, img_size=(img_size, img_size), mean=tuple(mean), std=tuple(std),
                                  has_masks=True, num_frames=num_frames, views=views)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Re-draw motion, position, clutter and crop for `epoch` (train split only)."""
        if self.split == "train":
            self.epoch = int(epoch)

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Full-canvas clip of item `index`.

        Returns:
            uint8 video (T, H, W_full), bool mask (T, H, W_full), label, and the x offset
            of the training crop (used when views=1 on the train split).
        """
        n, s = len(self.items), self.item_size
        H, W, T, f = self.img_size, self.canvas_width, self.num_frames, self.fragment_size
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], self.epoch, index])
        label = int(rng.integers(len(SPEEDS)))
        speed = SPEEDS[MOTION_NAMES[label]]
        dy, dx = _STEPS[int(rng.integers(len(_STEPS)))]
        travel = int(round(speed * (T - 1)))
        # Start anywhere such that the whole path stays inside the centre view.
        lo_y, hi_y = (travel, H - s) if dy < 0 else (0, H - s - travel * (dy > 0))
        lo_x = self._centre_x + (travel if dx < 0 else 0)
        hi_x = self._centre_x + H - s - (travel if dx > 0 else 0)
        start = (int(rng.integers(lo_y, hi_y + 1)), int(rng.integers(lo_x, hi_x + 1)))
        path = trajectory(start, (dy, dx), speed, T)
        canvas = np.zeros((H, W), dtype=np.uint8)
        lo_c, hi_c = (s - f) // 4, (s - f) - (s - f) // 4 + 1
        for _ in range(self.num_fragments):
            src = int(rng.integers(n - 1))
            src += src >= index                               # any item but this one
            cy, cx = rng.integers(lo_c, hi_c, size=2)
            y, x = int(rng.integers(H - f + 1)), int(rng.integers(W - f + 1))
            region = canvas[y:y + f, x:x + f]
            np.maximum(region, self.items[src, cy:cy + f, cx:cx + f], out=region)
        crop_x = int(rng.integers(W - H + 1))
        item = self.items[index]
        inside = item > MF_MASK_THRESHOLD
        video = np.repeat(canvas[None], T, axis=0)
        mask = np.zeros((T, H, W), dtype=bool)
        for t, (y, x) in enumerate(path):
            box = video[t, y:y + s, x:x + s]
            box[...] = np.where(inside, item, np.maximum(box, item))
            mask[t, y:y + s, x:x + s] = inside
        return video, mask, label, crop_x

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        video, mask, label, crop_x = self.generate(index % len(self))
        v = torch.from_numpy(video)[None].float().div_(255.0)               # (1, T, H, W_full)
        m = torch.from_numpy(mask)                                           # (T, H, W_full)
        offset = crop_x if (self.views == 1 and self.split == "train") else None
        v = spatial_crops(v, self.img_size, self.views, offset)             # (V, 1, T, S, S)
        m = spatial_crops(m, self.img_size, self.views, offset)             # (V, T, S, S)
        v = (v - self.info.mean[0]) / self.info.std[0]
        if self.views == 1:
            return {"video": v[0], "image": v[0], "label": label, "mask": m[0]}
        return {"video": v, "label": label, "mask": m}


def measure_video_stats(dataset: MovingFashionDataset, n: int = 500) -> tuple[tuple[float], tuple[float]]:
    """Pixel mean and std (in [0, 1]) of the full canvases of the first `n` clips."""
    n = min(n, len(dataset))
    total = total_sq = count = 0.0
    for i in range(n):
        v = dataset.generate(i)[0].astype(np.float64) / 255.0
        total, total_sq, count = total + v.sum(), total_sq + np.square(v).sum(), count + v.size
    mean = total / count
    return (round(float(mean), 4),), (round(float(np.sqrt(max(total_sq / count - mean ** 2, 1e-12))), 4),)


def resize_items(items: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) uint8 items resized bilinearly to (N, size, size)."""
    if items.shape[1:] == (size, size):
        return items
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in items])


@functools.lru_cache(maxsize=3)
def _fashion_items(path: str, split: str, split_seed: int, item_size: int) -> np.ndarray:
    items, _ = load_idx_split(path, split, split_seed, val_size=MF_VAL_SIZE)
    items = resize_items(items, item_size)  # once per split, not once per data set
    items.setflags(write=False)
    return items


def moving_fashion(path: Optional[str] = None, split: str = "train", seed: int = 0, split_seed: int = 0,
                   **kw: Any) -> MovingFashionDataset:
    """The moving-fashion clips of one split.

    Args:
        path: directory of Fashion-MNIST idx files (default: the Debian package's).
        split: "train" (55k items), "val" (5k) or "test" (10k).
        seed: generation seed.
        split_seed: seed of the train/val partition of the items.
        **kw: `MovingFashionDataset` options (num_frames, views, limit, ...).
    """
    check_split(split)
    path = path or default_fashion_dir()
    if path is None:
        raise DataError("moving-fashion needs the Fashion-MNIST idx files: use moving-fashion:DIR")
    existing_path("moving-fashion", path)
    items = _fashion_items(str(path), split, split_seed, int(kw.get("item_size", 20)))
    return MovingFashionDataset(items, split, seed, **kw)


# -------------------------------------------------------------------------- videofolder

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
# TimeSformer's Kinetics normalisation.
KINETICS_MEAN, KINETICS_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)


def sample_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` frame indices spread uniformly over `total` frames (segment centres)."""
    return np.floor((np.arange(num_frames) + 0.5) * total / num_frames).astype(np.int64)


def decode_clip(path: str | os.PathLike, num_frames: int, short_side: int) -> np.ndarray:
    """Decode `num_frames` uniformly spaced RGB frames, shorter side resized to `short_side`.

    Args:
        path: a video file PyAV/FFmpeg can read.
        num_frames: T.
        short_side: the shorter side after resizing (bilinear; aspect ratio kept).

    Returns:
        uint8 (T, H, W, 3) with min(H, W) == short_side.

    Raises:
        VideoError: missing, unreadable, without a video stream, or fewer than T frames.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video not found: {path}")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"no video stream in {path}")
            stream = container.streams.video[0]
            # Decoding all frames is simplest and exact (container frame counts can be
            # wrong); frames are shrunk at once so memory stays small.
            for frame in container.decode(stream):
                img = _resize_short(frame.to_image(), short_side)
                if frames and img.shape != frames[0].shape:
                    # A stream whose frame size changes midway (found by fuzzing): every frame
                    # takes the first one's size, so the clip stays one array.
                    img = np.asarray(Image.fromarray(img).resize(frames[0].shape[1::-1], Image.BILINEAR))
                frames.append(img)
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise VideoError(f"cannot decode video {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    if len(frames) < num_frames:
        raise VideoError(f"video {path} has {len(frames)} frames; need at least {num_frames}")
    return np.stack([frames[i] for i in sample_indices(len(frames), num_frames)])


def _resize_short(img: Image.Image, short_side: int) -> np.ndarray:
    w, h = img.size
    scale = short_side / min(w, h)
    size = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
    return np.asarray(img.convert("RGB").resize(size, Image.BILINEAR))


def read_video_labels(root: Path, split: str) -> list[tuple[str, str]]:
    """(filename, label) rows of `<root>/<split>/labels.tsv` or else `<root>/labels.tsv`."""
    for cand in (root / split / "labels.tsv", root / "labels.tsv"):
        if cand.is_file():
            base = cand.parent
            rows = [r for r in read_table(cand) if r and r[0].strip() and not r[0].startswith("#")]
            bad = [r for r in rows if len(r) < 2]
            if bad:
                raise DataError(f"{cand}: expected 'filename<TAB>label' per line, got {bad[0]!r}")
            return [(str(base / r[0].strip()), r[1].strip()) for r in rows]
    raise DataError(f"videofolder: no labels.tsv in {root} (or {root / split}); "
                    "expected lines 'filename<TAB>label'")


class VideoFolderDataset(Dataset):
    """Real videos listed in a `labels.tsv`; one clip of T uniformly sampled frames per file.

    Args:
        root: directory holding `labels.tsv` (or `<split>/labels.tsv`) and the videos.
        split: which labels file to prefer (see `read_video_labels`).
        num_frames: T.
        img_size: crop side; frames are resized so their shorter side equals it.
        views: 1 (centre crop) or 3 (left, centre, right).
        class_names: fix the label order (default: sorted labels, or 0..K-1 for integer labels).
        mean, std: normalisation (default: TimeSformer's Kinetics values).
    """

    def __init__(self, root: str | os.PathLike, split: str = "test", num_frames: int = 8, img_size: int = 224,
                 views: int = 1, class_names: Optional[Sequence[str]] = None,
                 mean: Sequence[float] = KINETICS_MEAN, std: Sequence[float] = KINETICS_STD):
        check_split(split)
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"videofolder: not a directory: {root}")
        crop_offsets(img_size, img_size, views)  # validates `views`
        self.rows = read_video_labels(root, split)
        if not self.rows:
            raise DataError(f"videofolder: {root} lists no videos")
        labels = [lab for _, lab in self.rows]
        if class_names is None:
            if all(lab.lstrip("-").isdigit() for lab in labels):
                class_names = tuple(str(i) for i in range(max(int(x) for x in labels) + 1))
            else:
                class_names = tuple(sorted(set(labels)))
        self.class_index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted(set(labels) - set(self.class_index))
        if unknown:
            raise DataError(f"videofolder: labels not among the class names: {', '.join(unknown[:5])}")
        self.num_frames, self.img_size, self.views = num_frames, img_size, views
        self.info = VideoDataInfo(kind="videofolder", num_classes=len(class_names), class_names=tuple(class_names),
                                  in_chans=3, img_size=(img_size, img_size), mean=tuple(mean), std=tuple(std),
                                  has_masks=False, num_frames=num_frames, views=views)

    def __len__(self) -> int:
        return len(self.rows)

    def source_name(self, index: int) -> str:
        return self.rows[index][0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.rows[index]
        clip = decode_clip(path, self.num_frames, self.img_size)            # (T, H, W, 3) uint8
        v = torch.from_numpy(clip).permute(3, 0, 1, 2).float().div_(255.0)  # (3, T, H, W)
        m = torch.as_tensor(self.info.mean).view(3, 1, 1, 1)
        s = torch.as_tensor(self.info.std).view(3, 1, 1, 1)
        v = spatial_crops((v - m) / s, self.img_size, self.views)           # (V, 3, T, S, S)
        if self.views == 1:
            return {"video": v[0], "image": v[0], "label": self.class_index[label]}
        return {"video": v, "label": self.class_index[label]}


def videofolder(path: str, split: str = "test", **kw: Any) -> VideoFolderDataset:
    """`videofolder:DIR` (see `VideoFolderDataset`)."""
    return VideoFolderDataset(path, split, **kw)


# ------------------------------------------------------------- builders for build_dataset


def build_moving_fashion(path: Optional[str], split: str, seed: int, **kw: Any) -> MovingFashionDataset:
    """`moving-fashion[:DIR]` for `iared.data.build_dataset`."""
    return moving_fashion(path, split, seed, **kw)


def build_videofolder(path: Optional[str], split: str, seed: int, **kw: Any) -> VideoFolderDataset:
    """`videofolder:DIR` for `iared.data.build_dataset` (seed unused: files are fixed)."""
    if not path:
        raise DataError("videofolder needs a path: use videofolder:DIR")
    return videofolder(path, split, **kw)
