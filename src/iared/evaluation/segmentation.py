"""Weakly-supervised segmentation metrics for heatmaps, as pure functions of tensors.

A heatmap "segments" an image when it is high on the object and low elsewhere. The
protocol is the one of the ViT-explainability literature (Chefer et al., "Transformer
Interpretability Beyond Attention Visualization", CVPR 2021, evaluation on
ImageNet-Segmentation), which IA-RED² reports in its Table 1:

1. upsample the patch-grid heatmap bilinearly to the mask's pixels (`upsample_heatmap`);
2. min-max normalise each image's heatmap to [0, 1] and call a pixel foreground when it
   is above that image's mean (`binarize`);
3. count, for each of the two classes (background 0, foreground 1), correct pixels,
   labelled pixels, intersection and union (`segmentation_counts`). Counts are summed
   over the whole data set before any ratio is taken (`segmentation_metrics`), exactly
   as Chefer et al. accumulate `total_correct`, `total_inter`, ...;
4. mAP: the average precision of the continuous heatmap as a per-pixel foreground score,
   computed per image and averaged over images (`average_precision`).

All metrics are percentages, 0-100, as in the papers.
`SegmentationMeter` strings these together over batches.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heatmaps import explain_spec

# The keys of a counts dict; each holds a (2,) tensor indexed by class (0 bg, 1 fg).
COUNT_KEYS = ("correct", "labelled", "intersection", "union")


def upsample_heatmap(grid_scores: Tensor, grid_hw: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """Patch-grid scores to a pixel heatmap by bilinear interpolation.

    Args:
        grid_scores: (B, G) one score per patch, in raster order (G = h * w).
        grid_hw: (h, w), the patch grid.
        out_hw: (H, W), the output size in pixels.

    Returns:
        (B, H, W) float heatmap. `align_corners=False` as in Chefer et al.'s
        `F.interpolate(..., scale_factor=16, mode="bilinear")`.
    """
    h, w = grid_hw
    B, G = grid_scores.shape
    if G != h * w:
        raise ValueError(f"{G} grid scores do not fill a {h}x{w} grid")
    grid = grid_scores.float().reshape(B, 1, h, w)
    return F.interpolate(grid, size=tuple(out_hw), mode="bilinear", align_corners=False)[:, 0]


def normalize_heatmap(heatmap: Tensor) -> Tensor:
    """Min-max normalise each image's heatmap (B, ...) to [0, 1].

    A constant heatmap (max == min) becomes all zeros rather than NaN: it carries no
    information, and `binarize` then calls every pixel background.
    """
    flat = heatmap.float().flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp_min(torch.finfo(flat.dtype).tiny)
    return ((flat - lo) / span).reshape(heatmap.shape)


def binarize(heatmap: Tensor) -> Tensor:
    """Foreground prediction: per image, normalised heatmap above its own mean.

    Args:
        heatmap: (B, H, W) (or any (B, ...)) continuous scores, higher = more object.

    Returns:
        bool tensor of the same shape, True for foreground.
    """
    norm = normalize_heatmap(heatmap)
    mean = norm.flatten(1).mean(dim=1).reshape((-1,) + (1,) * (heatmap.dim() - 1))
    return norm > mean  # strictly above, as Chefer et al.'s `Res.gt(Res.mean())`


def segmentation_counts(pred_fg: Tensor, gt_fg: Tensor) -> dict[str, Tensor]:
    """Per-class pixel counts of one batch, to be summed over batches.

    Args:
        pred_fg: (B, H, W) bool predicted foreground.
        gt_fg: (B, H, W) bool (or 0/1) ground-truth foreground.

    Returns:
        dict with `COUNT_KEYS`, each a (2,) int64 tensor indexed by class (0 background,
        1 foreground): pixels of the class predicted correctly, pixels labelled with the
        class, and the intersection and union of predicted and true class regions.
    """
    if pred_fg.shape != gt_fg.shape:
        raise ValueError(f"prediction {tuple(pred_fg.shape)} and mask {tuple(gt_fg.shape)} differ in shape")
    pred_fg, gt_fg = pred_fg.bool(), gt_fg.bool()
    out = {k: torch.zeros(2, dtype=torch.int64) for k in COUNT_KEYS}
    for c, (pred_c, gt_c) in enumerate(((~pred_fg, ~gt_fg), (pred_fg, gt_fg))):
        inter = (pred_c & gt_c).sum().cpu()
        out["correct"][c] = inter  # correct pixels of class c = the intersection for class c
        out["labelled"][c] = gt_c.sum().cpu()
        out["intersection"][c] = inter
        out["union"][c] = (pred_c | gt_c).sum().cpu()
    return out


def add_counts(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum two counts dicts (from `segmentation_counts`) key by key."""
    return {k: a[k] + b[k] for k in COUNT_KEYS}


def segmentation_metrics(counts: dict[str, Tensor]) -> dict[str, float]:
    """Pixel accuracy, mean class accuracy and mean IoU, in percent, from summed counts.

    pixel_acc = sum_c correct_c / sum_c labelled_c;
    mAcc = mean_c correct_c / labelled_c; mIoU = mean_c intersection_c / union_c, over the
    two classes (background, foreground). A class with no labelled pixels (or empty
    union) counts as 0 for that class, as Chefer et al.'s `1.0 * inter / (eps + union)`.
    """
    correct = counts["correct"].double()
    labelled = counts["labelled"].double()
    inter = counts["intersection"].double()
    union = counts["union"].double()
    eps = torch.finfo(torch.float64).tiny
    return {
        "pixel_acc": float(100.0 * correct.sum() / labelled.sum().clamp_min(eps)),
        "mAcc": float(100.0 * (correct / labelled.clamp_min(eps)).mean()),
        "mIoU": float(100.0 * (inter / union.clamp_min(eps)).mean()),
    }


def segmentation_scores(pred_fg: Tensor, gt_fg: Tensor) -> dict[str, Union[float, Tensor]]:
    """Counts of one batch (accumulable with `add_counts`) and the metrics they give.

    Args:
        pred_fg: (B, H, W) bool predicted foreground (e.g. from `binarize`).
        gt_fg: (B, H, W) bool ground-truth foreground.

    Returns:
        the `segmentation_counts` entries ((2,) tensors) plus `pixel_acc`, `mAcc`,
        `mIoU` (floats, percent) of this batch alone. For a data set, sum the counts over
        batches and call `segmentation_metrics` (or use `SegmentationMeter`): averaging
        per-batch percentages would weight batches, not pixels.
    """
    counts = segmentation_counts(pred_fg, gt_fg)
    return {**counts, **segmentation_metrics(counts)}


def average_precision(scores: Tensor, gt_fg: Tensor) -> Tensor:
    """Average precision of per-pixel foreground scores against a mask, per image.

    The same quantity as `sklearn.metrics.average_precision_score` (step-wise, no
    interpolation): with pixels ranked by decreasing score, and one operating point per
    distinct score value (ties enter together),
    AP = sum_n (R_n - R_{n-1}) P_n. Images with no foreground pixel get AP 0 (sklearn
    gives NaN there; Chefer et al. apply `np.nan_to_num`).

    Args:
        scores: (B, H, W) (or (B, ...)) continuous scores, higher = more foreground.
        gt_fg: same shape, bool ground truth.

    Returns:
        (B,) AP per image in percent.
    """
    if scores.shape != gt_fg.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and mask {tuple(gt_fg.shape)} differ in shape")
    s = scores.detach().double().flatten(1)
    y = gt_fg.bool().flatten(1)
    out = torch.zeros(s.shape[0], dtype=torch.float64)
    for b in range(s.shape[0]):
        order = torch.argsort(s[b], descending=True)
        sb, yb = s[b][order], y[b][order].double()
        n_pos = yb.sum()
        if n_pos == 0:
            continue
        tp = yb.cumsum(0)
        # The last index of each run of equal scores is an operating point.
        last = torch.ones_like(sb, dtype=torch.bool)
        last[:-1] = sb[1:] != sb[:-1]
        tp = tp[last]
        n_pred = torch.arange(1, sb.numel() + 1, dtype=torch.float64)[last]
        precision = tp / n_pred
        recall = tp / n_pos
        d_recall = torch.diff(recall, prepend=recall.new_zeros(1))
        out[b] = (d_recall * precision).sum()
    return 100.0 * out


class SegmentationMeter:
    """Accumulates segmentation metrics of heatmaps over a data set.

    Example:
        meter = SegmentationMeter()
        for images, masks in loader:
            meter.update(upsample_heatmap(explain(model, images, "rollout"), hw, masks.shape[-2:]), masks)
        meter.compute()  # {"pixel_acc": ..., "mAcc": ..., "mIoU": ..., "mAP": ...}
    """

    def __init__(self) -> None:
        self.counts = {k: torch.zeros(2, dtype=torch.int64) for k in COUNT_KEYS}
        self.ap_sum = 0.0
        self.num_images = 0

    def update(self, heatmaps: Tensor, masks: Tensor) -> None:
        """Add a batch.

        Args:
            heatmaps: (B, h, w) continuous heatmaps; when (h, w) differs from the masks'
                size they are upsampled bilinearly first (so a patch grid reshaped to
                (B, h, w) can be passed directly).
            masks: (B, H, W) bool (or 0/1) foreground masks.
        """
        if heatmaps.dim() != 3 or masks.dim() != 3 or heatmaps.shape[0] != masks.shape[0]:
            raise ValueError(f"expected heatmaps (B, h, w) and masks (B, H, W), got "
                             f"{tuple(heatmaps.shape)} and {tuple(masks.shape)}")
        if heatmaps.shape[-2:] != masks.shape[-2:]:
            B, h, w = heatmaps.shape
            heatmaps = upsample_heatmap(heatmaps.reshape(B, h * w), (h, w), tuple(masks.shape[-2:]))
        heatmaps = heatmaps.detach().float().cpu()
        masks = masks.bool().cpu()
        self.counts = add_counts(self.counts, segmentation_counts(binarize(heatmaps), masks))
        self.ap_sum += float(average_precision(heatmaps, masks).sum())
        self.num_images += heatmaps.shape[0]

    def compute(self) -> dict[str, float]:
        """`pixel_acc`, `mAcc`, `mIoU` from the summed counts and `mAP` (mean over images), in percent."""
        out = segmentation_metrics(self.counts)
        out["mAP"] = self.ap_sum / max(self.num_images, 1)
        return out


def segmentation_metrics_for(model: nn.Module, loader, methods: Union[Sequence[str], Mapping[str, nn.Module]],
                             device: str, limit_batches: Optional[int]) -> dict[str, dict[str, float]]:
    """Heatmap segmentation metrics ("segmentation" of docs/results-format.md) of each explainer.

    Args:
        model: the checkpoint's model (its IA-RED² policy is used for "iared"; the other
            explainers read the backbone's attention and never call the policy).
        loader: yields dicts with "image" and "mask"; read once, whatever the methods.
        methods: explainers as `iared.evaluation.heatmaps.explain_spec` reads them, e.g.
            "rollout", "attention@block=6" or "iared@group=0" (0-based), all explaining
            `model`; or a mapping explainer -> the model it explains (IA-RED² and the
            baselines' backbone in one pass over the data).
        device: where to run.
        limit_batches: stop after this many batches.

    Returns:
        {method: {"pixel_acc", "mAcc", "mIoU", "mAP"}} in percent.
    """
    explained = dict(methods) if isinstance(methods, Mapping) else {m: model for m in methods}
    meters = {m: SegmentationMeter() for m in explained}
    for i, batch in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        images, masks = batch["image"].to(device), batch["mask"]
        for name, meter in meters.items():
            m = explained[name]
            heat = explain_spec(m, images, name)
            meter.update(heat.detach().float().reshape(-1, *m.patch_embed.grid_size).cpu(), masks)
    return {name: meter.compute() for name, meter in meters.items()}
