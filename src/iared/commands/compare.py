"""`compare_methods`: the one comparison of token policies that every command and benchmark runs.

Each method is a model with its policy attached; all see the same images. Per method:
accuracy with its standard error, GFLOPs per image (counted), keep ratios per stage, and,
when asked, images per second timed round-robin on the same batches, so that a busy
machine's changing load hits every method alike.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

from torch import Tensor, nn

from ..evaluation.accuracy import evaluate, standard_error
from ..evaluation.flops import count_flops
from ..evaluation.throughput import interleaved_throughput


def compare_methods(rows: Iterable[tuple[str, nn.Module]], loader: Iterable, flops_images: Tensor, *,
                    device: str = "cpu", limit_batches: Optional[int] = None, labeled: bool = True,
                    speed_batches: Sequence[Tensor] = (), repeats: Sequence[int] = (7,), warmup: int = 1,
                    counts_for: Callable[[str], bool] = lambda label: False, progress: bool = True,
                    log: Optional[Callable[[str], None]] = None) -> dict[str, dict[str, Any]]:
    """Every method on the same images, as result rows (the "methods" of docs/results-format.md).

    Args:
        rows: (label, model with its policy attached) pairs, "original" among them for the
            ratios; consumed one at a time (a generator may build each model lazily).
        loader: yields dicts with "image" (B, C, H, W) and "label" (B,).
        flops_images: the images whose multiply-adds are counted, one at a time.
        device: where to run.
        limit_batches: evaluate only this many batches.
        labeled: False for images without classes: top-1 and top-5 are None.
        speed_batches: batches to time every method on; the first gives "img_per_s" and
            "speedup", each other one "img_per_s_b<B>" and "speedup_b<B>" (B its size).
        repeats: timed rounds per batch of `speed_batches` (one value, or one per batch).
        warmup: untimed forwards per method before each batch's rounds.
        counts_for: whether to keep each image's kept-token count per stage for a label
            ("stage_counts", for K' histograms).
        progress: progress bars.
        log: one line per method as it finishes (None: silent).

    Returns:
        label -> {"top1", "top1_se", "top5", "top5_se", "n_images", "gflops_per_img",
        "keep_ratio", "token_ratio", "keep_ratio_per_stage", "stage_blocks", "policy",
        "img_per_s", "flops_ratio", "speedup", ...}.
    """
    results: dict[str, dict[str, Any]] = {}
    timed: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    for label, model in rows:
        results[label] = _accuracy_and_cost(model, loader, flops_images, device, limit_batches, labeled,
                                            counts_for(label), progress, label)
        if log is not None:
            r = results[label]
            top1 = "-" if r["top1"] is None else f"{r['top1']:6.2f}"
            log(f"{label:>16s}  top-1 {top1}  {r['gflops_per_img']:.4f} GFLOPs  keep {r['keep_ratio']:.3f}")
        if speed_batches:
            timed[label] = (model, {})
    rounds = list(repeats) if len(repeats) == len(speed_batches) else [repeats[0]] * len(speed_batches)
    for i, (images, n_rounds) in enumerate(zip(speed_batches, rounds)):
        key = "img_per_s" if i == 0 else f"img_per_s_b{images.shape[0]}"
        speeds = interleaved_throughput(timed, images, warmup=warmup, repeats=n_rounds)
        for label, rate in speeds.items():
            results[label][key] = rate
    relative_to_original(results, "gflops_per_img", "img_per_s")
    for key in {k for r in results.values() for k in r if k.startswith("img_per_s_b")}:
        relative_to_original(results, None, key, key.replace("img_per_s", "speedup"))
    return results


def _accuracy_and_cost(model: nn.Module, loader: Iterable, flops_images: Tensor, device: str,
                       limit_batches: Optional[int], labeled: bool, counts: bool, progress: bool,
                       label: str) -> dict[str, Any]:
    stats = evaluate(model, loader, device, limit_batches, collect_counts=counts, progress=progress, desc=label)
    n, policy = stats["n"], getattr(model, "policy", None)
    top1, top5 = (stats["top1"], stats["top5"]) if labeled else (None, None)
    row: dict[str, Any] = {
        "top1": top1, "top1_se": None if top1 is None else standard_error(top1, n),
        "top5": top5, "top5_se": None if top5 is None else standard_error(top5, n),
        "gflops_per_img": float(count_flops(model, flops_images).mean()) / 1e9,
        "img_per_s": None,
        "keep_ratio": stats["keep_ratio"], "token_ratio": stats["token_ratio"],
        "keep_ratio_per_stage": stats["keep_ratio_per_stage"], "stage_blocks": stats["stage_blocks"],
        "n_images": n,
        "policy": policy.config() if hasattr(policy, "config") else None,
    }
    if counts:
        row["stage_counts"] = stats["stage_counts"]
    return row


def relative_to_original(rows: dict[str, dict[str, Any]], flops_key: Optional[str], rate_key: str,
                         speedup_key: str = "speedup") -> None:
    """Add `flops_ratio` (from `flops_key`, unless None) and `speedup_key` (from `rate_key`)
    to every row, against the "original" row (docs/results-format.md)."""
    ref = rows.get("original")
    if ref is None:
        return
    for row in rows.values():
        if flops_key is not None:
            row["flops_ratio"] = ref[flops_key] / row[flops_key] if row[flops_key] else None
        if row.get(rate_key) and ref.get(rate_key):
            row[speedup_key] = row[rate_key] / ref[rate_key]
