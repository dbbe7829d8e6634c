"""Measured speed: images per second of a model on a fixed batch.

`measure_throughput` is the one number `iared eval` and `iared bench speed` report. The
recipe is the usual one for wall-clock benchmarks on a shared machine: run a few
warm-up forwards (allocator, oneDNN kernel selection, lazy init), then time several
repetitions and report the median, which is robust to a neighbour stealing the CPU for
one repetition. Everything runs under `torch.inference_mode` with the model in eval
mode, so policies drop tokens for real (compact execution).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn


def _synchronize(device: torch.device) -> None:
    # CUDA launches are asynchronous: without a sync the timer measures the launch only.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 7) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn`, after `warmup` untimed calls.

    Args:
        fn: the work to time (called with no arguments).
        device: where the work runs (CUDA is synchronised around each call).
        warmup: untimed calls first.
        repeats: timed calls.

    Returns:
        The `repeats` durations in seconds, in call order.
    """
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def measure_throughput(model: nn.Module, images: Tensor, warmup: int = 3, repeats: int = 7,
                       forward_kwargs: Optional[dict[str, Any]] = None) -> float:
    """Images per second of `model` on the batch `images` (median over repetitions).

    The model is put in eval mode for the measurement (so a policy removes tokens
    for real) and restored to its previous mode afterwards.

    Args:
        model: the classifier, already on the device of `images`.
        images: (B, C, H, W) one batch; throughput is B / median(forward seconds).
        warmup: untimed forwards before timing.
        repeats: timed forwards; the median is reported.
        forward_kwargs: extra keyword arguments for `model(...)`.

    Returns:
        Images per second.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    kwargs = forward_kwargs or {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            times = time_forward(lambda: model(images, **kwargs), images.device, warmup, repeats)
    finally:
        model.train(was_training)
    return images.shape[0] / statistics.median(times)
