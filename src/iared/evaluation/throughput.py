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
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..backbones.kernels import cpu_kernels, resolve_kernels
from ..backbones.tokens import ReductionInfo
from ..errors import UserError


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


def interleaved_throughput(models: dict[str, tuple[nn.Module, dict[str, Any]]], inputs: Tensor, warmup: int = 2,
                           repeats: int = 7) -> dict[str, float]:
    """Inputs (images or clips) per second of several models, timed round-robin on one batch.

    On a shared machine the load changes over minutes; timing method A's repeats, then
    B's, would charge each method with whatever load its own minute had. Interleaving
    the repeats (A, B, C, A, B, C, ...) exposes every method to the same load, so their
    ratios (speedups) are comparable even when the absolute numbers are not.

    Args:
        models: name -> (model, forward keyword arguments).
        inputs: the batch every model is timed on: (B, C, H, W) images or (B, C, T, H, W) clips.
        warmup: untimed forwards per model first.
        repeats: timed forwards per model; the median is used.

    Returns:
        name -> inputs per second.
    """
    modes = {name: m.training for name, (m, _) in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            for m, kw in models.values():
                stack.enter_context(cpu_kernels(m))  # oneDNN linears on CPU, as `measure_throughput`
                m.eval()
                time_forward(lambda: m(inputs, **kw), inputs.device, warmup, 0)
            for _ in range(repeats):
                for name, (m, kw) in models.items():
                    times[name] += time_forward(lambda: m(inputs, **kw), inputs.device, 0, 1)
    finally:
        for name, (m, _) in models.items():
            m.train(modes[name])
    return {name: inputs.shape[0] / statistics.median(t) for name, t in times.items()}


# -- `iared bench speed`: every method on one backbone, budgets matched ----------------
#
# Budgets. Every method is set to keep about `keep_ratio` of the patch tokens, measured
# as the mean over blocks and images of the patch tokens entering each block (from
# `ReductionInfo.block_tokens`): that is the quantity the FLOPs follow, so methods that
# drop at different depths (once at the input, per group, per block) are comparable.
#
# * IA-RED² with random weights has no meaningful scores, so its thresholds are
#   calibrated: with D groups the cumulative keep after group j is q^(j+1), q solving
#   mean_j q^(j+1) = keep_ratio (a geometric schedule, decreasing like the paper's
#   Fig. 4; r = 0.6, D = 3 gives 0.77 / 0.59 / 0.45). Group j's threshold is the
#   (1 - q)-quantile of its scores over the tokens entering it in a calibration batch,
#   set group by group (later groups keep everything while an earlier one is set).
# * Other policies: their one scalar knob (`keep_ratio`, ATS's `rho`) is bisected until
#   the calibration batch's keep ratio is within 0.01 of the target (6 steps at most).


def mean_keep(info: ReductionInfo, num_prefix: int) -> Tensor:
    """(B,) mean over blocks of the fraction of patch tokens entering each block."""
    return ((info.block_tokens.double() - num_prefix) / info.grid_size).mean(dim=1)


def geometric_schedule(keep_ratio: float, groups: int) -> list[float]:
    """Cumulative keep after each group, q^(j+1), with mean_j q^(j+1) = keep_ratio."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # the mean is increasing in q: bisection
        q = (lo + hi) / 2
        if sum(q ** (j + 1) for j in range(groups)) / groups < keep_ratio:
            lo = q
        else:
            hi = q
    q = (lo + hi) / 2
    return [q ** (j + 1) for j in range(groups)]


@torch.inference_mode()
def calibrate_iared(model: nn.Module, images: Tensor, keep_ratio: float) -> list[float]:
    """Set the IA-RED² thresholds so the model keeps about `keep_ratio` (see above).

    Args:
        model: a backbone patched with the "iared" policy (eval mode).
        images: the calibration batch.
        keep_ratio: target mean fraction of patch tokens entering a block.

    Returns:
        The thresholds, one per group (also set on `model.policy.threshold`).
    """
    policy = model.policy
    D = policy.groups
    cumulative = geometric_schedule(keep_ratio, D)
    thresholds = [-1.0] * D  # scores are in (0, 1): -1 keeps every token (and is valid JSON)
    for j in range(D):
        policy.threshold = list(thresholds)
        _, info = model(images, return_info=True, mode="greedy", execution="compact")
        rec = info.stages[j]
        step = cumulative[j] / (cumulative[j - 1] if j else 1.0)  # keep share of the tokens entering
        scores = rec.scores[rec.entering].double()
        thresholds[j] = float(torch.quantile(scores, 1.0 - step)) if step < 1 else -1.0
    policy.threshold = thresholds
    return thresholds


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


@torch.inference_mode()
def calibrate_knob(model: nn.Module, images: Tensor, keep_ratio: float, steps: int = 6,
                   tol: float = 0.01) -> Optional[float]:
    """Bisect a policy's budget (`rho`, `keep_ratio`, ...) until the keep ratio is near the target.

    ToMe's `r` (tokens merged per block) is an integer that keeps less as it grows: it is
    bisected over 0..grid_size // 2 (past that every block merges all it may) and set to
    the value whose keep ratio is closest to the target.

    Args:
        model: a backbone with a policy attached (eval mode).
        images: the calibration batch.
        keep_ratio: target mean fraction of patch tokens entering a block.
        steps: at most this many forwards (for `r`: about log2(grid_size) of them).
        tol: stop when the keep ratio is within `tol` of the target (a float knob).

    Returns:
        The budget set on the policy, or None when the policy has no scalar budget
        that keeps more as it grows (IA-RED²'s thresholds: `calibrate_iared`).
    """
    policy = model.policy
    if getattr(policy, "budget_setting", None) in (None, "threshold"):
        return None
    P = model.num_prefix_tokens

    def keeps(value: Any) -> float:
        policy.budget = value
        reset = getattr(model.policy, "reset", None)
        if callable(reset):
            reset()
        _, info = model(images, return_info=True, execution="compact")
        return float(mean_keep(info, P).mean())

    if policy.budget_setting == "r":
        # Integer bisection: the two values around the target are both tried (log2(G) forwards).
        lo, hi, best = 0, model.grid_size // 2, (math.inf, 0)
        while lo <= hi:
            r = (lo + hi) // 2
            got = keeps(r)
            best = min(best, (abs(got - keep_ratio), r))
            lo, hi = (r + 1, hi) if got > keep_ratio else (lo, r - 1)
        policy.budget = best[1]
        return best[1]
    lo, hi, value = 0.0, 1.0, keep_ratio  # the other knobs keep more as they grow, up to 1
    best = (math.inf, value)
    for _ in range(steps):
        got = keeps(value)
        best = min(best, (abs(got - keep_ratio), value))
        if abs(got - keep_ratio) <= tol:
            break
        lo, hi = (value, hi) if got < keep_ratio else (lo, value)
        value = (lo + hi) / 2
    policy.budget = best[1]
    return best[1]


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


# The image methods users compare; `methods=("all",)` adds every other registered policy (the ATS
# ablations), at the cost of a longer run.
DEFAULT_METHODS = ("iared", "ats", "topk", "random", "attention", "tome", "evit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # `iared bench speed --dtype`
MIN_ROUNDS, MAX_ROUNDS = 5, 1000  # automatic timing rounds of `bench_speed`


@dataclass(frozen=True)
class SpeedConfig:
    """Settings of `iared bench speed`."""

    arch: str                          # registry name of the backbone (random weights)
    img_size: Optional[int] = None     # None: the architecture's own
    batch_size: int = 64               # images per timed forward
    keep_ratio: float = 0.6            # budget every reduction method is calibrated to
    methods: Optional[tuple[str, ...]] = None  # None: original + DEFAULT_METHODS; ("all",): every policy
    warmup: int = 2                    # untimed forwards per method
    repeats: Optional[int] = None      # timed rounds (every method once per round; median); None: auto,
                                       # at least MIN_ROUNDS and until each method has min_time_s timed
    min_time_s: float = 2.0            # auto rounds: seconds of timed forwards every method reaches
    calib_images: int = 8              # calibration batch for the budgets
    flops_images: int = 2              # images counted exactly by `count_flops`
    threads: Optional[int] = None      # torch threads (None: torch's default)
    kernels: str = "auto"              # linear-layer kernels for every method: auto / onednn / aten
    dtype: str = "float32"             # weights, activations and inputs: float32 or bfloat16
    allocator: str = "steady"          # "steady": `steady_allocator()` first; "system": as the process found it
    device: str = "cpu"
    seed: int = 0
    command: str = ""                  # the exact command line, stored in the JSON


def _build_methods(model: nn.Module, names: list[str], calib: Tensor, keep_ratio: float,
                   log) -> dict[str, Optional[nn.Module]]:
    """name -> calibrated policy module (None for "original"); unusable policies are skipped."""
    from ..patch import patch, unpatch
    from ..reduction.policy import build_policy

    methods: dict[str, Optional[nn.Module]] = {}
    for name in names:
        if name == "original":
            methods[name] = None
            continue
        try:
            policy = build_policy(name, model).to(calib.device, calib.dtype)  # the backbone's dtype
            patch(model, policy)
            if name == "iared":
                calibrate_iared(model, calib, keep_ratio)
            else:
                calibrate_knob(model, calib, keep_ratio)
            methods[name] = policy
        except (ValueError, TypeError, RuntimeError) as e:  # e.g. a video-only policy
            log(f"skipping {name}: {e}")
        finally:
            unpatch(model)
    return methods


def _more_rounds(done: int, times: dict[str, list[float]], cfg: SpeedConfig) -> bool:
    """Whether `bench_speed` times another round, `done` rounds in (negative: warm-up left).

    Fixed `cfg.repeats`: exactly that many. Automatic: at least MIN_ROUNDS, then until every
    method has `cfg.min_time_s` seconds of timed forwards (a batch-1 forward of a few ms
    gets hundreds of rounds, a slow batch-64 one the minimum), at most MAX_ROUNDS: the
    median of a fast forward's times is only as steady as its number of samples.
    """
    if done < 0:
        return True
    if cfg.repeats is not None:
        return done < cfg.repeats
    if done < MIN_ROUNDS:
        return True
    return done < MAX_ROUNDS and min(sum(t) for t in times.values()) < cfg.min_time_s


def bench_speed(cfg: SpeedConfig, log=print) -> dict[str, Any]:
    """Throughput, GFLOPs and keep ratio of every method on one backbone (docs/results-format.md).

    Args:
        cfg: the settings.
        log: where progress lines go.

    Returns:
        The dictionary of docs/results-format.md: arch, img_size, batch_size, device, threads, command,
        methods: {name: img_per_s, gflops_per_img, keep_ratio, speedup, flops_ratio, ...}.
    """
    from tqdm import tqdm

    from ..backbones.registry import create_model
    from ..patch import available_policies, patch, unpatch
    from .flops import count_flops, vit_macs

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    allocator = steady_allocator() if cfg.allocator == "steady" else "system"
    torch.manual_seed(cfg.seed)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    dtype = DTYPES[cfg.dtype]
    overrides = {} if cfg.img_size is None else {"img_size": cfg.img_size}
    model = create_model(cfg.arch, **overrides).to(cfg.device, dtype).eval()
    img_size = model.patch_embed.img_size[0]
    P, dim = model.num_prefix_tokens, model.embed_dim
    mlp_ratio = model.config.mlp_ratio
    images = synthetic_images(cfg.batch_size, img_size, cfg.seed, model.config.in_chans).to(cfg.device, dtype)
    calib = synthetic_images(cfg.calib_images, img_size, cfg.seed + 1, model.config.in_chans).to(cfg.device, dtype)
    if cfg.methods is None:  # the image methods that are registered
        names = ["original"] + [m for m in DEFAULT_METHODS if m in available_policies()]
    elif tuple(cfg.methods) == ("all",):
        names = ["original"] + available_policies()
    else:
        names = list(cfg.methods)
    kernels = resolve_kernels(cfg.kernels, cfg.device, dtype)
    load_before = os.getloadavg()[0]

    log(f"calibrating budgets to keep ratio {cfg.keep_ratio} on {cfg.calib_images} images")
    methods = _build_methods(model, names, calib, cfg.keep_ratio, log)
    if not methods:
        raise UserError(f"none of the methods {', '.join(names)} runs on {cfg.arch} (see the lines above)")

    results: dict[str, dict[str, Any]] = {}
    # no_grad, not inference_mode: FlopCounterMode's module tracker needs autograd tensors.
    with torch.no_grad():
        for name, policy in tqdm(methods.items(), desc="FLOPs", file=sys.stderr, leave=False):
            if policy is not None:
                patch(model, policy)
            try:
                reset = getattr(policy, "reset", None)
                if callable(reset):
                    reset()
                _, info = model(images, return_info=True, execution="compact")
                analytic = vit_macs(info.block_tokens, dim, mlp_ratio)              # (B,) blocks only
                k = min(cfg.flops_images, cfg.batch_size)
                counted = count_flops(model, images[:k])                            # (k,) exact
                residual = float((counted - analytic[:k]).mean())  # embed, head, policy cost
                keep = mean_keep(info, P)
                results[name] = {"gflops_per_img": float(analytic.mean()) / 1e9 + residual / 1e9,
                                 "keep_ratio": float(keep.mean()), "keep_ratio_min": float(keep.min()),
                                 "keep_ratio_max": float(keep.max()), "_residual": residual}
                if name == "iared":
                    results[name]["thresholds"] = list(policy.threshold)
                if getattr(policy, "budget_setting", None) not in (None, "threshold"):
                    results[name][policy.budget_setting] = policy.budget
            finally:
                if policy is not None:
                    unpatch(model)

    # Interleaved rounds: each round times every method once, so a neighbour's burst of
    # load hits all methods alike instead of one; the median over rounds is reported.
    # Weights are packed once, the backbone's and each policy's (attaching a policy keeps
    # the backbone's modules, so their packed forwards stay valid across patch/unpatch).
    with torch.inference_mode(), contextlib.ExitStack() as packed:
        for module in [model, *(p for p in methods.values() if p is not None)]:
            packed.enter_context(cpu_kernels(module, kernels))
        times: dict[str, list[float]] = {name: [] for name in methods}
        bar = tqdm(desc=f"timing {len(methods)} methods", unit="round", file=sys.stderr, leave=False,
                   total=cfg.warmup + cfg.repeats if cfg.repeats is not None else None)
        done = -cfg.warmup  # rounds timed so far; negative while warming up
        while _more_rounds(done, times, cfg):
            timed, done = done >= 0, done + 1
            bar.update(1)
            for name, policy in methods.items():
                if policy is not None:
                    patch(model, policy)
                try:
                    t = time_forward(lambda: model(images, execution="compact"), images.device, 0, 1)[0]
                finally:
                    if policy is not None:
                        unpatch(model)
                if timed:
                    times[name].append(t)
        bar.close()
    load_after = os.getloadavg()[0]

    base = results.get("original")
    base_residual = base["_residual"] if base else 0.0
    full_gflops = base["gflops_per_img"] if base else float("nan")
    base_ips = cfg.batch_size / statistics.median(times["original"]) if base else float("nan")
    out_methods = {}
    for name, r in results.items():
        ips = cfg.batch_size / statistics.median(times[name])
        policy_cost = (r.pop("_residual") - base_residual) / 1e9
        # `speedup` is the ratio of median throughputs. `speedup_paired` is the median
        # over rounds of (original's time / this method's time) within the same round: a
        # shared machine drifts between slow and fast spells over seconds, both forwards
        # of one round see the same spell, so it is the steadier estimate of the two.
        paired = statistics.median(o / t for o, t in zip(times["original"], times[name])) if base else float("nan")
        row = {"img_per_s": ips, "gflops_per_img": r["gflops_per_img"], "keep_ratio": r["keep_ratio"],
               "speedup": ips / base_ips, "speedup_paired": paired,
               "flops_ratio": full_gflops / r["gflops_per_img"]}
        row["of_limit"] = row["speedup"] / row["flops_ratio"]
        row["reduction_gflops_per_img"] = policy_cost
        row["reduction_cost_pct"] = 100.0 * policy_cost / full_gflops
        row.update({k: v for k, v in r.items() if k not in row})
        row["times_s"] = times[name]
        out_methods[name] = row
    return {"arch": cfg.arch, "img_size": img_size, "batch_size": cfg.batch_size, "device": cfg.device,
            "threads": torch.get_num_threads(), "dtype": cfg.dtype, "kernels": kernels, "allocator": allocator,
            "command": cfg.command,
            "keep_ratio_target": cfg.keep_ratio,
            "warmup": cfg.warmup, "repeats": done, "repeats_auto": cfg.repeats is None,
            **({"min_time_s": cfg.min_time_s} if cfg.repeats is None else {}), "torch": torch.__version__,
            "device_name": device_name(cfg.device),
            "load_avg_1min": [load_before, load_after], "methods": out_methods}
