"""Video evaluation as in the IA-RED² paper's Table 3: clip-1 and video-1 error, clips/s.

* clip-1 error: one clip per video, the centre view, top-1 error (%);
* video-1 error: the left, centre and right views of the clip, softmax probabilities
  averaged, top-1 error (%) of the average;
* clips/s: forwards of single-view clips per second (median of timed repeats, eval
  mode, so policies drop tokens for real);
* GFLOPs per clip (multiply-adds, counted on single clips so no padding is counted) and
  the kept share of patch tokens.

The data set must give three views per item (`views=3`: "video" is (3, C, T, H, W),
left/centre/right) so both errors come from the same forwards.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .flops import count_flops
from .throughput import measure_throughput

CENTRE_VIEW = 1  # views are ordered left, centre, right


def video_errors(view_logits: Tensor, labels: Tensor, centre: int = CENTRE_VIEW) -> dict[str, float]:
    """clip-1 and video-1 errors (%) from per-view logits.

    Args:
        view_logits: (N, V, K) logits of each of the V views of N videos.
        labels: (N,) true classes.
        centre: index of the centre view (the clip-1 view).

    Returns:
        {"clip1_err", "video1_err"} in percent.
    """
    clip_pred = view_logits[:, centre].argmax(-1)
    video_pred = view_logits.softmax(-1).mean(dim=1).argmax(-1)
    n = max(labels.shape[0], 1)
    return {"clip1_err": 100.0 * float((clip_pred != labels).sum()) / n,
            "video1_err": 100.0 * float((video_pred != labels).sum()) / n}


@torch.no_grad()
def collect_view_logits(model: nn.Module, data: Dataset, *, batch_size: int = 16, mode: Any = None,
                        limit: Optional[int] = None, device: torch.device = torch.device("cpu"),
                        progress: bool = False) -> dict[str, Tensor]:
    """Run every view of every item through `model` (eval mode).

    Args:
        model: a video classifier, possibly patched with a policy.
        data: items {"video": (V, C, T, H, W), "label"}.
        batch_size: videos per forward (each forward sees batch_size * V clips).
        mode: the policy's per-forward mode.
        limit: first `limit` items only.
        device: where to run.
        progress: show a tqdm bar.

    Returns:
        {"logits": (N, V, K), "labels": (N,), "keep_ratio": (N, V) kept share of patch tokens}.
    """
    was_training = model.training
    model.eval()
    n = len(data) if limit is None else min(limit, len(data))
    loader = DataLoader(Subset(data, range(n)), batch_size=batch_size, shuffle=False)
    logits, labels, keep = [], [], []
    try:
        for batch in tqdm(loader, desc="eval video", disable=not progress, leave=False, file=sys.stderr):
            video = batch["video"].to(device)
            if video.dim() != 6:
                raise ValueError("video evaluation needs multi-view items (build the data with views=3)")
            B, V = video.shape[:2]
            out, info = model(video.flatten(0, 1), return_info=True, mode=mode)   # (B*V, K)
            logits.append(out.reshape(B, V, -1).float().cpu())
            keep.append(info.keep_ratio.reshape(B, V).float().cpu())
            labels.append(batch["label"])
    finally:
        model.train(was_training)
    return {"logits": torch.cat(logits), "labels": torch.cat(labels), "keep_ratio": torch.cat(keep)}


def evaluate_video(model: nn.Module, data: Dataset, *, batch_size: int = 16, mode: Any = None,
                   limit: Optional[int] = None, device: torch.device = torch.device("cpu"),
                   speed_batch: int = 16, speed_repeats: int = 5, flops_clips: int = 8,
                   progress: bool = False) -> dict[str, Any]:
    """Table 3's row for one method: errors, speed, FLOPs and keep ratio.

    Args:
        model: the (patched) video classifier.
        data: 3-view items.
        batch_size: videos per evaluation forward.
        mode: the policy's mode.
        limit: evaluate the first `limit` items.
        device: where to run.
        speed_batch: clips per timed forward (centre views of the first items).
        speed_repeats: timed forwards; the median is used (0: skip the speed, e.g. to time
            several methods together with `interleaved_throughput`).
        flops_clips: clips whose FLOPs are counted (0: skip).
        progress: show a tqdm bar.

    Returns:
        {"clip1_err", "video1_err", "clips_per_s", "gflops_per_clip", "keep_ratio", "n"}.
    """
    out = collect_view_logits(model, data, batch_size=batch_size, mode=mode, limit=limit, device=device,
                              progress=progress)
    result: dict[str, Any] = video_errors(out["logits"], out["labels"])
    result["keep_ratio"] = float(out["keep_ratio"].mean())
    result["n"] = int(out["labels"].shape[0])
    k = min(max(speed_batch, flops_clips), len(data))
    centre = torch.stack([data[i]["video"][CENTRE_VIEW] for i in range(k)]).to(device)   # (k, C, T, H, W)
    fwd = {"mode": mode} if mode is not None else {}
    if speed_repeats > 0:
        result["clips_per_s"] = measure_throughput(model, centre[:speed_batch], warmup=2, repeats=speed_repeats,
                                                   forward_kwargs=fwd)
    if flops_clips > 0:
        was_training = model.training
        model.eval()
        try:
            result["gflops_per_clip"] = float(count_flops(model, centre[:flops_clips], **fwd).mean()) / 1e9
        finally:
            model.train(was_training)
    return result
