"""Where a batch-1 forward's time goes, and the best any token policy could do on this machine.

Random weights, one image, every method calibrated to keep about 60 % of the patch tokens
(`build_methods`, as `iared bench speed`). With each kind of CPU kernels ("onednn": linears
alone; "native": also each block and policy stage in one C++ call), timed in interleaved rounds
(`interleaved_times`; each round patches each policy in, as `iared bench speed` does):

- each method's forward, and inside it each block's and each policy call's time: the median over
  rounds of a wall-clock stamp around its `forward` (about 1 µs each), so a block's cost is read
  at the token count it really runs at, caches as the forward leaves them;
- each method's *schedule*: the unreduced model's own blocks run at the token counts the method
  left in front of each block, the rows cut by a slice, with no scoring, sampling or merging.
  Its speedup over the unreduced model divided by its FLOPs ratio (`ceiling`) bounds what any
  policy with that schedule can reach on this machine: it is what the blocks lose at fewer tokens,
  before any policy cost. (The FLOPs of a schedule are its blocks' exact multiply-adds at those
  counts plus the unreduced embedding and head; the policies' own work is left out.)

    .venv/bin/python benchmarks/block_times.py --arch vit_tiny_patch16_224
writes benchmarks/results/block_times_vit_tiny_patch16_224.json (with the command).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

import iared  # noqa: E402
from iared.backbones.kernels import cpu_kernels, resolve_kernels  # noqa: E402
from iared.backbones.tokens import with_rows  # noqa: E402
from iared.commands.speed import DEFAULT_METHODS, build_methods  # noqa: E402
from iared.evaluation.flops import count_flops, vit_macs  # noqa: E402
from iared.evaluation.throughput import (device_name, interleaved_times, steady_allocator,  # noqa: E402
                                         synthetic_images)
from iared.fileio import write_json  # noqa: E402


def _median_ms(values: list[float], skip: int) -> float:
    return 1e3 * statistics.median(values[skip:])


@contextlib.contextmanager
def stamping(modules: dict[str, torch.nn.Module], stamps: dict[str, list[float]]):
    """Append each module's forward time to `stamps[name]` inside the block (its forward restored after)."""
    saved = {name: vars(mod).get("forward") for name, mod in modules.items()}  # a kernel's own, if any

    def stamped(name, forward):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = forward(*args, **kwargs)
            stamps[name].append(time.perf_counter() - t0)
            return out
        return timed

    for name, mod in modules.items():
        mod.forward = stamped(name, mod.forward)
    try:
        yield
    finally:
        for name, mod in modules.items():
            if saved[name] is None:
                del mod.forward
            else:
                mod.forward = saved[name]


@contextlib.contextmanager
def attached(model, policy):
    """`model` with `policy` patched in (None: unreduced) inside the block."""
    if policy is None:
        yield
        return
    iared.patch(model, policy)
    try:
        yield
    finally:
        iared.unpatch(model)


def run_schedule(model, image: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The unreduced model with its tokens cut to `counts[i]` rows in front of block i (a slice: the
    first rows, CLS among them), nothing scored: the cheapest way to run that token schedule."""
    tokens = model.embed(image, "compact")
    rows = torch.arange(tokens.x.shape[1])
    for blk, n in zip(model.blocks, counts):
        if n < tokens.x.shape[1]:
            tokens = with_rows(tokens, tokens.x[:, :n], rows[:n])
        tokens = blk(tokens)
    return model.forward_head(tokens)


def block_schedules(model, methods: dict[str, Optional[torch.nn.Module]], image) -> dict[str, list[int]]:
    """Tokens (prefix included) entering each block, per method, on `image`."""
    out = {}
    with torch.inference_mode():
        for name, policy in methods.items():
            with attached(model, policy):
                _, info = model(image, return_info=True, execution="compact")
            out[name] = info.block_tokens[0].tolist()
    return out


def schedule_gflops(model, image, schedules: dict[str, list[int]]) -> dict[str, float]:
    """GFLOPs of each schedule: its blocks' multiply-adds plus the unreduced embedding and head."""
    dim, mlp_ratio = model.embed_dim, model.config.mlp_ratio
    blocks = {name: float(vit_macs(torch.tensor([counts]), dim, mlp_ratio)[0]) for name, counts in schedules.items()}
    rest = float(count_flops(model, image)[0]) - blocks["original"]  # no policy is attached here
    return {name: (macs + rest) / 1e9 for name, macs in blocks.items()}


def measure(model, methods: dict[str, Optional[torch.nn.Module]], schedules: dict[str, list[int]], image,
            kernels: str, rounds: int, warmup: int) -> dict[str, dict]:
    """name -> total, per-block and policy milliseconds of the method, and its schedule's total."""
    stamps = {name: defaultdict(list) for name in methods}

    def forward(name):
        def run():
            with attached(model, methods[name]):
                modules = {f"block {i}": blk for i, blk in enumerate(model.blocks)}
                if methods[name] is not None:
                    modules["policy"] = methods[name]
                with stamping(modules, stamps[name]):
                    model(image, execution="compact")
        return run

    def schedule(name):
        return lambda: run_schedule(model, image, schedules[name])

    runs = {name: forward(name) for name in methods}
    runs.update({f"{name} schedule": schedule(name) for name in methods if name != "original"})
    with torch.inference_mode(), contextlib.ExitStack() as packed:
        for module in [model, *(p for p in methods.values() if p is not None)]:
            packed.enter_context(cpu_kernels(module, kernels))
        # Round-robin, so every run sees the machine's same spells; the stamps keep the warm-up calls too.
        totals = interleaved_times(runs, image.device, warmup, rounds, progress=f"{kernels}: {len(runs)} runs")
    rows = {}
    for name, st in stamps.items():
        row = {"total_ms": _median_ms(totals[name], 0), "block_tokens": schedules[name],
               "block_ms": [_median_ms(st[f"block {i}"], warmup) for i in range(len(model.blocks))]}
        if st["policy"]:
            calls = len(st["policy"]) // (warmup + rounds)  # policy calls per forward
            per_forward = [sum(st["policy"][r * calls:(r + 1) * calls]) for r in range(warmup + rounds)]
            row.update(policy_ms=_median_ms(per_forward, warmup), policy_calls=calls)
        if name != "original":
            row["schedule_ms"] = _median_ms(totals[f"{name} schedule"], 0)
        rows[name] = row
    return rows


def ratios(rows: dict[str, dict], gflops: dict[str, float]) -> None:
    """Adds each method's speedup, its schedule's speedup, FLOPs ratio and ceiling to its row."""
    base = rows["original"]["total_ms"]
    for name, row in rows.items():
        if name == "original":
            continue
        row["speedup"] = base / row["total_ms"]
        row["schedule_speedup"] = base / row["schedule_ms"]
        row["schedule_flops_ratio"] = gflops["original"] / gflops[name]
        row["ceiling"] = row["schedule_speedup"] / row["schedule_flops_ratio"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--keep-ratio", type=float, default=0.6)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", default=None, help="default: benchmarks/results/block_times_<arch>.json")
    args = ap.parse_args()
    allocator = steady_allocator()
    torch.manual_seed(0)
    model = iared.create_model(args.arch).eval()
    size = model.patch_embed.img_size[0]
    image, calib = synthetic_images(1, size, 0), synthetic_images(8, size, 1)  # as `iared bench speed`
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "drops no token" until calibrated
        methods = build_methods(model, ["original", *DEFAULT_METHODS], calib, args.keep_ratio)
    schedules = block_schedules(model, methods, image)
    gflops = schedule_gflops(model, image, schedules)
    kinds = ["onednn"] + (["native"] if resolve_kernels("auto") == "native" else [])
    results = {}
    for kind in kinds:
        rows = measure(model, methods, schedules, image, kind, args.rounds, args.warmup)
        ratios(rows, gflops)
        results[kind] = rows
        print(f"{kind}: original {rows['original']['total_ms']:.2f} ms")
        for name, row in rows.items():
            if name != "original":
                print(f"  {name:10s} speedup {row['speedup']:.2f}, its schedule {row['schedule_speedup']:.2f} "
                      f"of FLOPs ratio {row['schedule_flops_ratio']:.2f}: ceiling {row['ceiling']:.2f}")
    out = Path(args.json or f"benchmarks/results/block_times_{args.arch}.json")
    write_json(out, {"command": shlex.join(["python", *sys.argv]), "arch": args.arch, "batch_size": 1,
                     "threads": torch.get_num_threads(), "allocator": allocator, "torch": torch.__version__,
                     "device_name": device_name("cpu"), "load_avg_1min": os.getloadavg()[0],
                     "keep_ratio_target": args.keep_ratio, "gflops_per_img": gflops, "kernels": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
