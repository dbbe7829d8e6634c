"""Measured speed: images per second of a model on a fixed batch.

`measure_throughput` is the one number `iared eval` and `iared bench speed` report. The
recipe is the usual one for wall-clock benchmarks on a shared machine: run a few
warm-up forwards (allocator, oneDNN kernel selection, lazy init), then time several
repetitions and report the median, which is robust to a neighbour stealing the CPU for
one repetition. Everything runs under `torch.inference_mode` with the model in eval
mode, so policies drop tokens for real (compact execution), and on CPU the linear
layers run through oneDNN with packed weights (`iared.backbones.kernels`; every method
of one comparison gets the same kernels).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..backbones.kernels import cpu_kernels


def steady_allocator() -> str:
    """Make glibc keep freed memory for reuse instead of handing each large block back.

    By default glibc serves every allocation above its mmap threshold with a fresh
    `mmap`, page-faulted in anew on every forward; an unreduced model's large activations
    all are, a reduced model's mostly not, which flatters every reduction method
    (docs/performance.md, "Allocator"). Raising the mmap and trim thresholds is the tuning
    PyTorch's CPU guides recommend; it changes only this process.

    Returns:
        What the allocator is now, as recorded in result files: "glibc, no mmap/trim" or
        "system" where glibc's `mallopt` is not available.
    """
    import ctypes
    import ctypes.util

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc, no mmap/trim" if ok else "system"


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
                       forward_kwargs: Optional[dict[str, Any]] = None, kernels: str = "auto") -> float:
    """Images per second of `model` on the batch `images` (median over repetitions).

    The model is put in eval mode for the measurement (so a policy removes tokens
    for real) and restored to its previous mode afterwards.

    Args:
        model: the classifier, already on the device of `images`.
        images: (B, C, H, W) one batch; throughput is B / median(forward seconds).
        warmup: untimed forwards before timing.
        repeats: timed forwards; the median is reported.
        forward_kwargs: extra keyword arguments for `model(...)`.
        kernels: "auto", "onednn" or "aten" (see `iared.backbones.kernels.cpu_kernels`).

    Returns:
        Images per second.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    kwargs = forward_kwargs or {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), cpu_kernels(model, kernels):
            times = time_forward(lambda: model(images, **kwargs), images.device, warmup, repeats)
    finally:
        model.train(was_training)
    return images.shape[0] / statistics.median(times)


Rounds = Union[int, Callable[[int, dict[str, list[float]]], bool]]


def interleaved_times(forwards: dict[str, Callable[[], Any]], device: torch.device, warmup: int = 2,
                      rounds: Rounds = 7, progress: Optional[str] = None) -> dict[str, list[float]]:
    """Seconds of each forward, timed round-robin: every round runs each forward once.

    On a shared machine the load changes over minutes; timing method A's repeats, then
    B's, would charge each method with whatever load its own minute had. Interleaving
    the rounds (A, B, C, A, B, C, ...) exposes every method to the same load, so their
    ratios (speedups) are comparable even when the absolute numbers are not.

    Args:
        forwards: name -> the work of one forward (called with no arguments).
        device: where the work runs (CUDA is synchronised around each call).
        warmup: untimed rounds first.
        rounds: timed rounds, or `more(done, times) -> bool`, asked before each round.
        progress: a progress bar with this label (None: none).

    Returns:
        name -> the seconds of each timed round, in order.
    """
    more = rounds if callable(rounds) else (lambda done, _times: done < rounds)
    times: dict[str, list[float]] = {name: [] for name in forwards}
    bar = None
    if progress is not None:
        from tqdm import tqdm

        bar = tqdm(desc=progress, unit="round", file=sys.stderr, leave=False,
                   total=None if callable(rounds) else warmup + rounds)
    for _ in range(warmup):
        for fn in forwards.values():
            time_forward(fn, device, 0, 1)
        if bar is not None:
            bar.update(1)
    done = 0
    while more(done, times):
        for name, fn in forwards.items():
            times[name] += time_forward(fn, device, 0, 1)
        done += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return times


def interleaved_throughput(models: dict[str, tuple[nn.Module, dict[str, Any]]], inputs: Tensor, warmup: int = 2,
                           repeats: int = 7) -> dict[str, float]:
    """Inputs (images or clips) per second of several models, timed round-robin on one batch
    (`interleaved_times`), each in eval mode with oneDNN linears on CPU (`cpu_kernels`).

    Args:
        models: name -> (model, forward keyword arguments).
        inputs: the batch every model is timed on: (B, C, H, W) images or (B, C, T, H, W) clips.
        warmup: untimed rounds first.
        repeats: timed rounds; the median is used.

    Returns:
        name -> inputs per second.
    """
    modes = {name: m.training for name, (m, _) in models.items()}
    try:
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for m, _ in models.values():
                stack.enter_context(cpu_kernels(m))
                m.eval()
            forwards = {name: (lambda m=m, kw=kw: m(inputs, **kw)) for name, (m, kw) in models.items()}
            times = interleaved_times(forwards, inputs.device, warmup, repeats)
    finally:
        for name, (m, _) in models.items():
            m.train(modes[name])
    return {name: inputs.shape[0] / statistics.median(t) for name, t in times.items()}


def device_name(device: str) -> str:
    """The processor the numbers come from: the GPU's name, or the CPU model from /proc/cpuinfo."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        model = None
    return f"CPU {model or platform.processor() or platform.machine()}"


def synthetic_images(n: int, img_size: int, seed: int, in_chans: int = 3) -> Tensor:
    """Random images that differ from each other: smooth fields plus noise of varied strength.

    Speed depends only on token counts, but with identical noise statistics every image
    would keep about the same count; varying the mix makes per-image counts differ, the
    case where padding to the batch's longest image costs.
    """
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, in_chans, 7, 7, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(img_size, img_size), mode="bilinear", align_corners=False)
    noise = torch.randn(n, in_chans, img_size, img_size, generator=gen)
    mix = torch.rand(n, 1, 1, 1, generator=gen) ** 2
    return (1 - mix) * smooth + 2 * mix * noise
