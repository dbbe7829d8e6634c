"""Top-k accuracy and one pass of a (possibly token-reducing) classifier over a data set.

`accuracy` is timm's eight-line function (timm/utils/metrics.py), returning percentages.
`evaluate` also averages what the attached policy did (keep ratios per stage, tokens per
block), read from the `ReductionInfo` the model returns, so accuracy and token counts
come from the very same forward.
"""

from __future__ import annotations

import math

from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn


def accuracy(logits: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5)) -> list[float]:
    """Percentage of samples whose label is among the top-k logits, for each k.

    Args:
        logits: (B, C) scores.
        labels: (B,) class indices.
        topk: the k values; k larger than C counts as C (so top-5 of 3 classes is 100).

    Returns:
        One percentage (0-100) per k.
    """
    if logits.shape[0] == 0:
        return [0.0 for _ in topk]
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices.t()                 # (maxk, B)
    correct = pred.eq(labels.reshape(1, -1).expand_as(pred))    # (maxk, B)
    return [float(correct[: min(k, maxk)].reshape(-1).float().sum()) * 100.0 / logits.shape[0] for k in topk]


def _batches(loader: Iterable, limit_batches: Optional[int]):
    for i, batch in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            return
        yield batch


def standard_error(pct: float, n: int) -> float:
    """Binomial standard error, in points, of an accuracy of `pct` percent over `n` images."""
    p = pct / 100.0
    return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: str = "cpu", limit_batches: Optional[int] = None,
             collect_counts: bool = False, progress: bool = False, desc: str = "eval") -> dict[str, Any]:
    """Accuracy and token statistics of `model` (eval mode, compact execution) on `loader`.

    Args:
        model: a classifier whose forward accepts `return_info=True` (iared backbones).
        loader: yields dicts with "image" (B, C, H, W) and "label" (B,).
        device: where to run.
        limit_batches: stop after this many batches.
        collect_counts: also return, per stage, each image's kept patch-token count
            (for histograms such as the ATS paper's Fig. 6).
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        {"top1", "top5" (percent), "n" (images), "keep_ratio" (mean fraction of patch
        tokens alive after the last stage), "token_ratio" (mean over blocks of tokens
        entering the block / all tokens: the share of per-block work left),
        "keep_ratio_per_stage" (list, one per stage), "stage_blocks" (the blocks the
        stages sit at)} and, with `collect_counts`, "stage_counts" (list of (n,) tensors).
    """
    was_training = model.training
    model.eval()
    n = correct1 = correct5 = 0.0
    keep_sum = token_sum = 0.0
    stage_sums: list[float] = []
    stage_blocks: list[int] = []
    counts: list[list[Tensor]] = []
    batches = _batches(loader, limit_batches)
    if progress:
        from tqdm import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        if total is not None and limit_batches is not None:
            total = min(total, limit_batches)
        batches = tqdm(batches, total=total, desc=desc, leave=False)
    try:
        for batch in batches:
            images = batch["image"].to(device)
            labels = torch.as_tensor(batch["label"]).to(device)
            logits, info = model(images, return_info=True, execution="compact")
            b = images.shape[0]
            t1, t5 = accuracy(logits, labels)
            correct1 += t1 * b / 100.0
            correct5 += t5 * b / 100.0
            n += b
            keep_sum += float(info.keep_ratio.sum())
            full = model.grid_size + getattr(model, "num_prefix_tokens", 1)
            token_sum += float((info.block_tokens.double() / full).mean(dim=1).sum())
            if not stage_sums:
                stage_sums = [0.0] * len(info.stages)
                stage_blocks = [int(s.block) for s in info.stages]
                counts = [[] for _ in info.stages]
            for j, s in enumerate(info.stages):
                stage_sums[j] += float(s.keep_ratio.sum())
                if collect_counts:
                    counts[j].append(s.keep.sum(dim=1).cpu())
    finally:
        model.train(was_training)
    n = max(n, 1)
    out: dict[str, Any] = {
        "top1": correct1 * 100.0 / n, "top5": correct5 * 100.0 / n, "n": int(n),
        "keep_ratio": keep_sum / n, "token_ratio": token_sum / n,
        "keep_ratio_per_stage": [s / n for s in stage_sums], "stage_blocks": stage_blocks,
    }
    if collect_counts:
        out["stage_counts"] = [torch.cat(c) if c else torch.zeros(0, dtype=torch.long) for c in counts]
    return out
