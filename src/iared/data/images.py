"""Decoding any image file a person has into a clean 8-bit RGB or L picture.

`load_image` accepts grayscale, RGBA / LA / palette with transparency (composited on white,
or alpha dropped), CMYK, 16-bit and 32-bit integer ("I;16", "I"), float ("F") and
bi-level images, applies the EXIF orientation, and refuses what it cannot decode with an
`ImageError` whose one-line message names the file: missing, empty, not an image,
truncated (decoded in full with `img.load()`; `ImageFile.LOAD_TRUNCATED_IMAGES` is never
set, so a cut file is an error and not a grey bottom half), or too large (a
decompression-bomb guard checked from the header, before any pixels are decoded).

The small transforms below (`resize_center_crop`, `to_tensor`) are what the file-based
loaders use; they work on PIL images so one resampling filter is used everywhere.
"""

from __future__ import annotations

import math

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .base import ImageError

ImageSource = Union[str, os.PathLike, bytes]

MAX_PIXELS = 8192 * 8192  # refuse larger images: a 64-Mpixel RGB image is already 200 MB


def load_image(source: ImageSource, mode: str = "RGB", alpha: str = "white",
               name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file fully and convert it to 8-bit `mode`.

    Args:
        source: a path, or the file's bytes (e.g. read from a zip member).
        mode: "RGB" or "L".
        alpha: "white" composites transparent images on a white background;
            "drop" discards the alpha channel (keeping the stored colour under it).
        name: what error messages call the file (default: the path, or "<bytes>").
        max_pixels: refuse images with more pixels than this.

    Returns:
        A loaded PIL image in `mode`, independent of any open file.

    Raises:
        ImageError: with a one-line message naming the file.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', not {alpha!r}")
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        name = name or "<bytes>"
    else:
        path = Path(source)
        name = name or str(path)
        try:
            found = path.is_file()
            data = path.read_bytes() if found else b""
        except OSError as e:  # a name too long, no permission, ...
            raise ImageError(f"cannot read image {name}: {_one_line(e)}") from None
        if not found:
            raise ImageError(f"image not found: {name}")
    if not data:
        raise ImageError(f"empty image file: {name}")

    # Pillow warns (and over 2x its limit raises) on decompression bombs; we turn the
    # warning into an error so a huge file never silently allocates gigabytes.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(f"not an image (unrecognised format): {name}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"image too large (decompression-bomb guard): {name}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"cannot read image {name}: {_one_line(e)}") from None
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(f"image too large ({w}x{h} > {max_pixels} pixels): {name}")
        if w == 0 or h == 0:
            raise ImageError(f"image has zero size ({w}x{h}): {name}")
        try:
            img.load()  # decode every pixel now: a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"image too large (decompression-bomb guard): {name}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"truncated or corrupt image {name}: {_one_line(e)}") from None
    return _to_8bit(img, mode, alpha)


def _to_8bit(img: Image.Image, mode: str, alpha: str) -> Image.Image:
    """Convert any decoded Pillow mode to 8-bit `mode` (see `load_image`)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = Image.fromarray(_high_depth_to_uint8(img), "L")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode == "P":
        # Palette images with a transparent index must go through RGBA, or the transparent
        # pixels take whatever colour the palette stores for that index.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("L", "RGB") and "transparency" in img.info:
        img = img.convert("LA" if img.mode == "L" else "RGBA")
    elif img.mode in ("PA", "La", "RGBa"):
        img = img.convert("RGBA")

    if img.mode in ("RGBA", "LA"):
        if alpha == "drop":
            img = img.convert("RGB" if img.mode == "RGBA" else "L")
        else:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba).convert("RGB")
    # CMYK, YCbCr, LAB, HSV and the rest: Pillow's own conversion.
    return img.convert(mode) if img.mode != mode else img.copy()


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale 16-bit / 32-bit integer or float pixels to uint8.

    "I;16*" is 16-bit by definition: divide by 257 (65535 -> 255). Pillow also opens 16-bit
    PNGs and TIFFs as 32-bit "I", so an "I" image whose values exceed 255 is taken as 16-bit
    (values above 65535 are clipped), and one within [0, 255] is kept as is. "F" images in
    [0, 1] are scaled by 255, others clipped to [0, 255].
    """
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
    if img.mode == "F":
        a = a.astype(np.float64)
        if a.size and np.nanmin(a) >= 0.0 and np.nanmax(a) <= 1.0:
            a = a * 255.0
        return np.clip(np.nan_to_num(np.round(a)), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    if a.size and a.max() > 255:
        return np.round(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
           "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def resize_center_crop(img: Image.Image, size: tuple[int, int], crop_pct: float = 0.875,
                       interpolation: str = "bicubic", crop_mode: str = "center") -> Image.Image:
    """Resize the shorter side to size / crop_pct, then take the central `size` crop.

    This is timm's evaluation transform for ImageNet models (crop_pct 0.875: 256 -> 224).

    Args:
        img: a PIL image.
        size: (H, W) of the result.
        crop_pct: fraction of the resized image the crop covers (1.0: resize to fit exactly).
        interpolation: the resampling filter, by timm's name ("bicubic", "bilinear", ...).
        crop_mode: "center" as above; "squash": resize both sides to size / crop_pct
            (the aspect ratio is not kept), then crop the centre.

    Returns:
        A PIL image of exactly (H, W).
    """
    if interpolation not in FILTERS:
        raise ValueError(f"unknown interpolation {interpolation!r}: use one of {', '.join(FILTERS)}")
    resample = FILTERS[interpolation]
    th, tw = size
    w, h = img.size
    if crop_mode == "squash":
        nh, nw = math.floor(th / crop_pct), math.floor(tw / crop_pct)
        img = img.resize((nw, nh), resample) if (nw, nh) != (w, h) else img
        left, top = int(round((nw - tw) / 2.0)), int(round((nh - th) / 2.0))
        return img.crop((left, top, left + tw, top + th))
    if crop_mode != "center":
        raise ValueError(f"unknown crop_mode {crop_mode!r}: use 'center' or 'squash'")
    # As timm's `transforms_imagenet_eval` (torchvision's Resize): the shorter side becomes
    # floor(size / crop_pct) (224 / 0.9 -> 248), the longer one int(short * long / shorter).
    short = math.floor(max(th, tw) / crop_pct)
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    nw, nh = max(tw, nw), max(th, nh)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    left, top = int(round((nw - tw) / 2.0)), int(round((nh - th) / 2.0))  # as torchvision's CenterCrop
    return img.crop((left, top, left + tw, top + th))


def to_tensor(img: Image.Image) -> Tensor:
    """An 8-bit L or RGB PIL image as a float (C, H, W) tensor in [0, 1]."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(np.array(a.transpose(2, 0, 1))).float().div_(255.0)  # a copy: PIL arrays are read-only
