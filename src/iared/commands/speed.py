"""`iared bench speed`: every method on one backbone with random weights, budgets matched.

Every method is calibrated to keep about the same share of patch tokens
(`iared.reduction.budgets.calibrate_knob`), its GFLOPs counted, and all are timed in
interleaved rounds on one batch, so a busy machine's load hits them alike.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..backbones.kernels import cpu_kernels, resolve_kernels
from ..errors import UserError
from ..evaluation.throughput import device_name, interleaved_times, steady_allocator, synthetic_images
from ..reduction.budgets import calibrate_knob, mean_keep


# The image methods users compare; `methods=("all",)` adds every other registered policy (the ATS
# ablations), at the cost of a longer run.
DEFAULT_METHODS = ("iared", "ats", "topk", "random", "attention", "tome", "evit")
# Not a policy: timm's own VisionTransformer around the same weights, unreduced and as timm runs
# it, timed in the same rounds, so "is our unreduced backbone as fast as timm's" has one answer.
TIMM = "timm"
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
    progress: bool = True              # progress bars on stderr
    command: str = ""                  # the exact command line, stored in the JSON


def build_methods(model: nn.Module, names: list[str], calib: Tensor, keep_ratio: float,
                  log=print) -> dict[str, Optional[nn.Module]]:
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
            calibrate_knob(model, calib, keep_ratio)
            methods[name] = policy
        except (ValueError, TypeError, RuntimeError) as e:  # e.g. a video-only policy
            log(f"skipping {name}: {e}")
        finally:
            unpatch(model)
    return methods


def _more_rounds(done: int, times: dict[str, list[float]], cfg: SpeedConfig) -> bool:
    """Whether `bench_speed` times another round, `done` timed rounds in.

    Fixed `cfg.repeats`: exactly that many. Automatic: at least MIN_ROUNDS, then until every
    method has `cfg.min_time_s` seconds of timed forwards (a batch-1 forward of a few ms
    gets hundreds of rounds, a slow batch-64 one the minimum), at most MAX_ROUNDS: the
    median of a fast forward's times is only as steady as its number of samples.
    """
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
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    allocator = steady_allocator() if cfg.allocator == "steady" else "system"
    torch.manual_seed(cfg.seed)
    model, images, calib = _backbone_and_images(cfg)
    names = _method_names(cfg)
    kernels = resolve_kernels(cfg.kernels, cfg.device, DTYPES[cfg.dtype])
    load_before = os.getloadavg()[0]
    log(f"calibrating budgets to keep ratio {cfg.keep_ratio} on {cfg.calib_images} images")
    reference = _timm_reference(model, log) if TIMM in names else None
    methods = build_methods(model, [n for n in names if n != TIMM], calib, cfg.keep_ratio, log)
    if not methods:
        raise UserError(f"none of the methods {', '.join(names)} runs on {cfg.arch} (see the lines above)")
    costs = _count_costs(model, methods, images, cfg.flops_images, cfg.progress)
    if reference is not None:  # timm's model does the unreduced model's work; its row follows the original's
        original = costs.pop("original")
        costs = {"original": original, TIMM: dict(original), **costs}
    times = _time_methods(model, methods, images, kernels, cfg, reference)
    load_after = os.getloadavg()[0]
    return {"arch": cfg.arch, "img_size": model.patch_embed.img_size[0], "batch_size": cfg.batch_size,
            "device": cfg.device, "threads": torch.get_num_threads(), "dtype": cfg.dtype, "kernels": kernels,
            "allocator": allocator, "command": cfg.command, "keep_ratio_target": cfg.keep_ratio,
            "warmup": cfg.warmup, "repeats": len(next(iter(times.values()))), "repeats_auto": cfg.repeats is None,
            **({"min_time_s": cfg.min_time_s} if cfg.repeats is None else {}), "torch": torch.__version__,
            "device_name": device_name(cfg.device),
            "load_avg_1min": [load_before, load_after], "methods": _rows(costs, times, cfg.batch_size)}


def _backbone_and_images(cfg: SpeedConfig) -> tuple[nn.Module, Tensor, Tensor]:
    """The backbone (random weights, eval mode, `cfg.dtype`), the timed batch and the calibration batch."""
    from ..backbones.registry import create_model

    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    dtype = DTYPES[cfg.dtype]
    overrides = {} if cfg.img_size is None else {"img_size": cfg.img_size}
    model = create_model(cfg.arch, **overrides).to(cfg.device, dtype).eval()
    size, chans = model.patch_embed.img_size[0], model.config.in_chans
    images = synthetic_images(cfg.batch_size, size, cfg.seed, chans).to(cfg.device, dtype)
    calib = synthetic_images(cfg.calib_images, size, cfg.seed + 1, chans).to(cfg.device, dtype)
    return model, images, calib


def _method_names(cfg: SpeedConfig) -> list[str]:
    from ..reduction.policy import available_policies

    if cfg.methods is None:  # the image methods that are registered
        return ["original", TIMM] + [m for m in DEFAULT_METHODS if m in available_policies()]
    if tuple(cfg.methods) == ("all",):
        return ["original", TIMM] + available_policies()
    names = list(cfg.methods)
    if TIMM in names and "original" not in names:  # timm's row is measured against our unreduced model
        names.insert(0, "original")
    return names


def _timm_reference(model: nn.Module, log) -> Optional[nn.Module]:
    """timm's `VisionTransformer` sharing `model`'s weights, or None (with a line) where it cannot be."""
    try:
        from ..integrations.timm import to_timm

        return to_timm(model).eval()
    except (ImportError, ValueError, TypeError) as e:
        log(f"skipping {TIMM}: {e}")
        return None


def _count_costs(model: nn.Module, methods: dict[str, Optional[nn.Module]], images: Tensor,
                 flops_images: int, progress: bool = True) -> dict[str, dict[str, Any]]:
    """GFLOPs per image and keep ratios of every method on the timed batch.

    The blocks' multiply-adds follow from each image's token counts (`vit_macs`); what
    they leave out (embedding, head, the policy's own cost) is counted exactly on the
    first `flops_images` images and added as a per-image residual.
    """
    from tqdm import tqdm

    from ..evaluation.flops import count_flops, vit_macs
    from ..patch import patch, unpatch

    P, dim, mlp_ratio = model.num_prefix_tokens, model.embed_dim, model.config.mlp_ratio
    k = min(flops_images, images.shape[0])
    results: dict[str, dict[str, Any]] = {}
    # no_grad, not inference_mode: FlopCounterMode's module tracker needs autograd tensors.
    with torch.no_grad():
        for name, policy in tqdm(methods.items(), desc="FLOPs", file=sys.stderr, leave=False, disable=not progress):
            if policy is not None:
                patch(model, policy)
            try:
                reset = getattr(policy, "reset", None)
                if callable(reset):
                    reset()
                _, info = model(images, return_info=True, execution="compact")
                analytic = vit_macs(info.block_tokens, dim, mlp_ratio)              # (B,) blocks only
                residual = float((count_flops(model, images[:k]) - analytic[:k]).mean())
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
    return results


def _time_methods(model: nn.Module, methods: dict[str, Optional[nn.Module]], images: Tensor, kernels: str,
                  cfg: SpeedConfig, reference: Optional[nn.Module] = None) -> dict[str, list[float]]:
    """Seconds per forward of every method (and of timm's `reference`), in interleaved rounds
    (`interleaved_times`).

    One backbone serves every method (each round patches and unpatches each policy), its
    weights and each policy's packed once: attaching a policy keeps the backbone's
    modules, so their packed forwards stay valid across patch/unpatch. timm's model runs
    as timm runs it (its own modules, never packed).
    """
    from ..patch import patch, unpatch

    def forward(policy: Optional[nn.Module]):
        def run() -> None:
            if policy is not None:
                patch(model, policy)
            try:
                model(images, execution="compact")
            finally:
                if policy is not None:
                    unpatch(model)
        return run

    with torch.inference_mode(), contextlib.ExitStack() as packed:
        for module in [model, *(p for p in methods.values() if p is not None)]:
            packed.enter_context(cpu_kernels(module, kernels))
        runs = {name: forward(policy) for name, policy in methods.items()}
        if reference is not None:
            runs[TIMM] = lambda: reference(images)
        return interleaved_times(runs, images.device, cfg.warmup, lambda done, times: _more_rounds(done, times, cfg),
                                 progress=f"timing {len(runs)} methods" if cfg.progress else None)


def _rows(costs: dict[str, dict[str, Any]], times: dict[str, list[float]], batch_size: int
          ) -> dict[str, dict[str, Any]]:
    """The result row of every method: its throughput, costs and ratios to "original"."""
    base = costs.get("original")
    base_residual = base["_residual"] if base else 0.0
    full_gflops = base["gflops_per_img"] if base else float("nan")
    base_ips = batch_size / statistics.median(times["original"]) if base else float("nan")
    out = {}
    for name, r in costs.items():
        ips = batch_size / statistics.median(times[name])
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
        out[name] = row
    return out
