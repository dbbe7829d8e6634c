"""Figures of heatmaps: per-group overlays, kept patches, method comparisons, video strips.

Shared by `iared interpret` and the demo report. Everything here takes arrays or tensors
and returns a `matplotlib.figure.Figure` built without pyplot (so no global figure state,
no display, Agg rendering whatever the backend setting); `save_figure` writes it
atomically as a PNG.

How a heatmap is drawn (IA-RED², "Emergence of Interpretability"): a group's informative
scores over the *full* patch grid (tokens dropped by an earlier group score 0, which
`StageRecord.scores` already is) are reshaped to the patch grid (h, w), interpolated
bilinearly to the input size (`segmentation.upsample_heatmap`) and blended over the
image through a colormap. Scores live in [0, 1], so IA-RED² maps are drawn on that fixed
scale and stay comparable across groups; baseline maps (raw attention, rollout, ...)
have no fixed range and are min-max normalised per image. The number in the upper-left
corner of a panel is the ratio of patches still kept after that group, as in the
paper's Fig. 4 and Fig. 8.

Video (JointST): the grid holds T * S cells in the order n * T + t (patch-major, time
inner, see `backbones.jointst`); `frame_maps` turns it into one (h, w) map per frame.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ..backbones.jointst import frame_maps
from .segmentation import upsample_heatmap
from ..fileio import atomic_write

ArrayLike = Union[np.ndarray, Tensor]

DEFAULT_CMAP = "jet"      # the paper's heatmaps are jet-coloured
DEFAULT_ALPHA = 0.5       # heatmap weight in the blend
# Dropped patches are washed towards mid-grey rather than darkened: on the dark canvases of
# the cluttered data a darkened background patch would look exactly like a kept one.
DROPPED_FILL = 0.5        # the grey dropped patches are washed towards
DROPPED_FADE = 0.8        # how far (0: unchanged, 1: flat grey)


# -- pure array helpers -------------------------------------------------------------------


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().float().numpy() if isinstance(a, Tensor) else np.asarray(a)


def display_image(image: ArrayLike) -> np.ndarray:
    """Any image as an (H, W, 3) float array in [0, 1] for drawing.

    Args:
        image: (C, H, W) tensor with C in {1, 3}, or an (H, W) / (H, W, C) array, with
            values in [0, 1] (floats) or 0-255 (uint8). Grayscale is repeated to RGB.

    Returns:
        (H, W, 3) float32 in [0, 1].
    """
    if isinstance(image, Tensor):
        a = image.detach().cpu().float().numpy()
        if a.ndim == 3:
            a = a.transpose(1, 2, 0)  # tensors are channels-first: (C, H, W) -> (H, W, C)
    else:
        a = np.asarray(image)
        if a.dtype == np.uint8:
            a = a.astype(np.float32) / 255.0
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W), (H, W, C) or (C, H, W) image, got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.clip(a, 0.0, 1.0)


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo `(x - mean) / std` on a (C, H, W) tensor, clipped to [0, 1] for display."""
    m = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def grid_heatmap(grid_scores: ArrayLike, grid_hw: tuple[int, int], out_hw: tuple[int, int],
                 normalize: bool = False) -> np.ndarray:
    """One image's patch-grid scores as a pixel heatmap.

    Args:
        grid_scores: (G,) scores in raster order, G = h * w.
        grid_hw: (h, w).
        out_hw: (H, W) of the image the map is drawn over.
        normalize: min-max normalise to [0, 1] (for maps without a fixed range); else
            the scores are clipped to [0, 1].

    Returns:
        (H, W) float32 in [0, 1].
    """
    g = torch.as_tensor(_np(grid_scores), dtype=torch.float32).reshape(1, -1)
    heat = upsample_heatmap(g, grid_hw, out_hw)[0].numpy()
    if normalize:
        lo, hi = float(heat.min()), float(heat.max())
        heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    return np.clip(heat, 0.0, 1.0).astype(np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, cmap: str = DEFAULT_CMAP,
            alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Alpha-blend a colormapped heatmap over an image.

    Args:
        image: (H, W, 3) in [0, 1].
        heat: (H, W) in [0, 1].
        cmap: a matplotlib colormap name.
        alpha: weight of the heatmap colour.

    Returns:
        (H, W, 3) float32 in [0, 1]: (1 - alpha) * image + alpha * cmap(heat).
    """
    if image.shape[:2] != heat.shape:
        raise ValueError(f"image {image.shape[:2]} and heatmap {heat.shape} differ in size")
    colour = colormaps[cmap](heat)[..., :3]
    return ((1.0 - alpha) * image + alpha * colour).astype(np.float32)


def keep_mask_pixels(keep: ArrayLike, grid_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """A (G,) kept-patch mask as an (H, W) bool pixel mask (each patch a block of pixels).

    Nearest-neighbour: a pixel belongs to the patch whose cell it falls into, so an image
    size that the patch size divides gives exact patch blocks.
    """
    h, w = grid_hw
    k = _np(keep).astype(bool).reshape(h, w)
    H, W = out_hw
    rows = np.minimum((np.arange(H) * h) // H, h - 1)
    cols = np.minimum((np.arange(W) * w) // W, w - 1)
    return k[rows[:, None], cols[None, :]]


def kept_patches(image: np.ndarray, keep: ArrayLike, grid_hw: tuple[int, int],
                 fill: float = DROPPED_FILL, fade: float = DROPPED_FADE) -> np.ndarray:
    """The image with dropped patches greyed out: (1 - fade) * pixel + fade * fill.

    Args:
        image: (H, W, 3) in [0, 1].
        keep: (G,) bool, True for patches the model still computes on.
        grid_hw: (h, w).
        fill: the grey level dropped patches move towards (0 with fade 1: black).
        fade: how far they move.

    Returns:
        (H, W, 3) float32; kept patches unchanged.
    """
    mask = keep_mask_pixels(keep, grid_hw, image.shape[:2])
    return np.where(mask[:, :, None], image, (1.0 - fade) * image + fade * fill).astype(np.float32)


def merged_regions(image: np.ndarray, owner: ArrayLike, grid_hw: tuple[int, int],
                   edge: float = 1.0) -> np.ndarray:
    """The image as merged tokens see it (ToMe's figures): each token's cells in their mean colour.

    Args:
        image: (H, W, 3) in [0, 1].
        owner: (G,) for each grid cell, the cell index of the token covering it
            (`Tokens.owner`, ToMe's records' extras["owner"]).
        grid_hw: (h, w).
        edge: the grey level of the borders drawn between different tokens.

    Returns:
        (H, W, 3) float32.
    """
    H, W = image.shape[:2]
    h, w = grid_hw
    rows = np.minimum((np.arange(H) * h) // H, h - 1)
    cols = np.minimum((np.arange(W) * w) // W, w - 1)
    token = _np(owner).astype(np.int64).reshape(-1)[rows[:, None] * w + cols[None, :]]       # (H, W)
    count = np.bincount(token.ravel(), minlength=h * w).clip(min=1)
    mean = np.stack([np.bincount(token.ravel(), image[..., c].ravel(), minlength=h * w) / count
                     for c in range(3)], axis=-1)                                           # (G, 3)
    out = mean[token].astype(np.float32)
    border = np.zeros((H, W), dtype=bool)
    border[:-1] |= token[:-1] != token[1:]
    border[:, :-1] |= token[:, :-1] != token[:, 1:]
    out[border] = edge
    return out


def keep_ratio(keep: ArrayLike) -> float:
    """Fraction of the full grid that is kept."""
    k = _np(keep).astype(bool)
    return float(k.mean()) if k.size else 0.0


# -- figure building ----------------------------------------------------------------------


def _new_figure(rows: int, cols: int, cell: float, title: Optional[str]) -> tuple[Figure, np.ndarray]:
    # Constrained layout keeps the title right above the grid however many rows there are.
    fig = Figure(figsize=(cell * cols, cell * rows + (0.5 if title else 0.0)), layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas: renders without any display or pyplot
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def corner_text(ax, text: str) -> None:
    """Write `text` in the upper-left corner of an image axis (as the paper's Fig. 4)."""
    ax.text(0.03, 0.97, text, transform=ax.transAxes, ha="left", va="top", fontsize=9, color="white",
            bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "edgecolor": "none"})


def _show(ax, img: np.ndarray, label: Optional[str] = None) -> None:
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    if label:
        ax.set_title(label, fontsize=8)


def heatmap_panel(image: ArrayLike, grid_scores_per_group: Sequence[ArrayLike],
                  keep_masks_per_group: Sequence[ArrayLike], grid_hw: tuple[int, int],
                  title: Optional[str] = None, cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA,
                  cell: float = 2.2, labels: Optional[Sequence[str]] = None, normalize: bool = False) -> Figure:
    """One row: the image, one heatmap overlay per group, and the patches finally kept.

    Each overlay carries in its upper-left corner the ratio of the full grid kept after
    that group; the kept-patch image carries the final ratio.

    Args:
        image: the model's input for display, (C, H, W) tensor or (H, W[, C]) array in [0, 1].
        grid_scores_per_group: D arrays (G,) of informative scores in [0, 1] on the full grid
            (0 where a token was dropped earlier), G = h * w.
        keep_masks_per_group: D bool arrays (G,): tokens kept after each group.
        grid_hw: (h, w), the patch grid.
        title: figure title (e.g. the prediction).
        cmap, alpha: heatmap colormap and blend weight.
        cell: inches per panel.
        labels: one column title per group (default "group 1", "group 2", ...).
        normalize: min-max normalise each map (scores without a fixed scale, e.g. ATS's,
            which sum to 1 over the tokens); IA-RED²'s are drawn on [0, 1].

    Returns:
        The figure (save it with `save_figure`).
    """
    if len(grid_scores_per_group) != len(keep_masks_per_group):
        raise ValueError("one keep mask per group of scores is needed")
    img = display_image(image)
    H, W = img.shape[:2]
    D = len(grid_scores_per_group)
    fig, axes = _new_figure(1, D + 2, cell, title)
    _show(axes[0, 0], img, "input")
    for j, (scores, keep) in enumerate(zip(grid_scores_per_group, keep_masks_per_group)):
        ax = axes[0, j + 1]
        label = labels[j] if labels is not None else f"group {j + 1}"
        _show(ax, overlay(img, grid_heatmap(scores, grid_hw, (H, W), normalize=normalize), cmap, alpha), label)
        corner_text(ax, f"{keep_ratio(keep):.2f}")
    ax = axes[0, D + 1]
    if D:
        _show(ax, kept_patches(img, keep_masks_per_group[-1], grid_hw), "kept patches")
        corner_text(ax, f"{keep_ratio(keep_masks_per_group[-1]):.2f}")
    return fig


def merge_panel(image: ArrayLike, owner: ArrayLike, keep: ArrayLike, grid_hw: tuple[int, int],
                stages: int, title: Optional[str] = None, cell: float = 2.2) -> Figure:
    """One row for a merging policy (ToMe): the image, its merged tokens, the patches kept.

    Args:
        image: the model's input for display (see `display_image`).
        owner: (G,) the cell of the token covering each cell after the last block.
        keep: (G,) bool, cells whose own token is still there after the last block (the
            destinations and unmerged tokens).
        grid_hw: (h, w).
        stages: the number of merging blocks, for the label.
        title: figure title (e.g. the prediction).
        cell: inches per panel.

    Returns:
        The figure.
    """
    img = display_image(image)
    fig, axes = _new_figure(1, 3, cell, title)
    _show(axes[0, 0], img, "input")
    tokens = len(np.unique(_np(owner)))
    _show(axes[0, 1], merged_regions(img, owner, grid_hw), f"tokens after {stages} blocks")
    corner_text(axes[0, 1], f"{tokens}")
    _show(axes[0, 2], kept_patches(img, keep, grid_hw), "surviving tokens")
    corner_text(axes[0, 2], f"{keep_ratio(keep):.2f}")
    return fig


def method_grid(images: Sequence[ArrayLike], heatmaps: Mapping[str, Sequence[ArrayLike]],
                grid_hw: tuple[int, int], row_labels: Optional[Sequence[str]] = None,
                fixed_range: Sequence[str] = ("iared",), title: Optional[str] = None,
                cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA, cell: float = 1.8) -> Figure:
    """Heatmap methods side by side, one image per row (the paper's Fig. 3).

    Columns: image | one overlay per method, in the mapping's order (e.g. raw attention,
    rollout, GradCAM, IA-RED²).

    Args:
        images: N images for display (see `display_image`), all of one size.
        heatmaps: method name -> N grid maps (G,) (e.g. rows of `explain(...)`).
        grid_hw: (h, w).
        row_labels: optional text per row, written in the image's corner (e.g. class).
        fixed_range: methods whose maps are already in [0, 1] and drawn on that scale;
            every other method is min-max normalised per image.
        title: figure title.
        cmap, alpha, cell: drawing options.

    Returns:
        The figure.
    """
    def draw(ax, img, name, grid_map, label):
        heat = grid_heatmap(grid_map, grid_hw, img.shape[:2], normalize=name not in fixed_range)
        _show(ax, overlay(img, heat, cmap, alpha), label)

    return _method_rows(images, heatmaps, draw, "maps", row_labels, title, cell)


def _method_rows(images: Sequence[ArrayLike], per_method: Mapping[str, Sequence[ArrayLike]], draw, what: str,
                 row_labels: Optional[Sequence[str]], title: Optional[str], cell: float) -> Figure:
    """One row per image: the image (with its row label), then `draw(ax, img, name, item,
    column title or None)` for each method's item of that image."""
    names = list(per_method)
    for name in names:
        if len(per_method[name]) != len(images):
            raise ValueError(f"method {name!r} has {len(per_method[name])} {what} for {len(images)} images")
    fig, axes = _new_figure(len(images), len(names) + 1, cell, title)
    for i, image in enumerate(images):
        img = display_image(image)
        _show(axes[i, 0], img, "image" if i == 0 else None)
        if row_labels is not None:
            corner_text(axes[i, 0], row_labels[i])
        for c, name in enumerate(names):
            draw(axes[i, c + 1], img, name, per_method[name][i], name if i == 0 else None)
    return fig


def kept_grid(images: Sequence[ArrayLike], keeps: Mapping[str, Sequence[ArrayLike]], grid_hw: tuple[int, int],
              row_labels: Optional[Sequence[str]] = None, title: Optional[str] = None, cell: float = 1.8) -> Figure:
    """Token-reduction methods side by side, one image per row: the patches each keeps
    (the ATS paper's Fig. A.5). The corner number is the kept fraction.

    Args:
        images: N images for display (see `display_image`), all of one size.
        keeps: method name -> N kept-patch masks (G,) (e.g. the last stage's `keep`).
        grid_hw: (h, w).
        row_labels: optional text per row under the image (e.g. the class).
        title: figure title.
        cell: inches per panel.
    """
    def draw(ax, img, name, keep, label):
        _show(ax, kept_patches(img, keep, grid_hw), label)
        corner_text(ax, f"{keep_ratio(keep):.2f}")

    return _method_rows(images, keeps, draw, "masks", row_labels, title, cell)


def video_strip(frames: ArrayLike, grid_scores_per_group: Sequence[ArrayLike],
                keep_masks_per_group: Sequence[ArrayLike], num_frames: int, grid_hw: tuple[int, int],
                title: Optional[str] = None, cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA,
                cell: float = 1.6) -> Figure:
    """Per-frame heatmaps of a JointST clip: one column per frame, one row per group.

    Row 0 shows the frames; row j + 1 the overlay of group j's scores on each frame, with
    the ratio of that frame's patches kept after group j in the corner; the last row the
    patches kept after the last group (as the paper's Fig. 8).

    Args:
        frames: (T, H, W[, C]) array or (C, T, H, W) tensor in [0, 1].
        grid_scores_per_group: D arrays (T * S,) in the JointST order n * T + t.
        keep_masks_per_group: D bool arrays (T * S,), same order.
        num_frames: T.
        grid_hw: (h, w) patches per frame.
        title, cmap, alpha, cell: as in `heatmap_panel`.

    Returns:
        The figure.
    """
    if isinstance(frames, Tensor) and frames.dim() == 4 and frames.shape[0] in (1, 3) \
            and frames.shape[1] == num_frames:
        frames = frames.permute(1, 0, 2, 3)  # (C, T, H, W) -> (T, C, H, W)
    imgs = [display_image(frames[t]) for t in range(num_frames)]
    D = len(grid_scores_per_group)

    def per_frame(grid: ArrayLike) -> np.ndarray:  # (T*S,) -> (T, h*w) in raster order per frame
        g = torch.as_tensor(_np(grid), dtype=torch.float32).reshape(1, -1)
        return frame_maps(g, num_frames, grid_hw)[0].reshape(num_frames, -1).numpy()

    fig, axes = _new_figure(D + 2, num_frames, cell, title)
    score_maps = [per_frame(s) for s in grid_scores_per_group]
    keep_maps = [per_frame(k) > 0.5 for k in keep_masks_per_group]
    for t, img in enumerate(imgs):
        _show(axes[0, t], img, f"t={t}")
        for j in range(D):
            ax = axes[j + 1, t]
            _show(ax, overlay(img, grid_heatmap(score_maps[j][t], grid_hw, img.shape[:2]), cmap, alpha))
            corner_text(ax, f"{keep_ratio(keep_maps[j][t]):.2f}")
        if D:
            ax = axes[D + 1, t]
            _show(ax, kept_patches(img, keep_maps[-1][t], grid_hw))
            corner_text(ax, f"{keep_ratio(keep_maps[-1][t]):.2f}")
    for j in range(D):
        axes[j + 1, 0].text(-0.08, 0.5, f"group {j + 1}", transform=axes[j + 1, 0].transAxes, rotation=90,
                            ha="right", va="center", fontsize=8)
    if D:
        axes[D + 1, 0].text(-0.08, 0.5, "kept", transform=axes[D + 1, 0].transAxes, rotation=90,
                            ha="right", va="center", fontsize=8)
    return fig


# -- writing ------------------------------------------------------------------------------


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes) -> None:
    """Write `data` to `path` atomically (see `iared.fileio`)."""
    atomic_write(path, data)


def figure_png(fig: Figure, dpi: int = 120) -> bytes:
    """Render a figure to PNG bytes."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def save_figure(fig: Figure, path: Union[str, os.PathLike], dpi: int = 120) -> Path:
    """Write `fig` as a PNG at `path` atomically (temp file + rename) and return the path."""
    path = Path(path)
    atomic_write_bytes(path, figure_png(fig, dpi))
    return path


__all__ = [
    "atomic_write_bytes", "corner_text", "denormalize", "display_image", "figure_png", "grid_heatmap",
    "heatmap_panel", "keep_mask_pixels", "keep_ratio", "kept_patches", "merge_panel", "merged_regions",
    "method_grid", "overlay",
    "save_figure", "video_strip",
]
