"""Where a batch-1 forward's time goes: each block and each policy stage, timed inside the forward.

Random weights, one image, IA-RED² calibrated to keep about 60 % of the patch tokens
(`calibrate_knob`, as `iared bench speed`); the unreduced model and IA-RED² are timed with each
kind of CPU kernels ("onednn": linears alone; "native": also each block in one C++ call), in
interleaved rounds (`interleaved_times`; each round patches the policy in, as `iared bench speed`
does). Each block's and each policy call's time is the median over rounds of a wall-clock stamp
around its `forward` (about 1 µs of overhead per stamp), so the table shows what a block costs at
the token count it really runs at, caches as the forward leaves them.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

import iared  # noqa: E402
from iared.backbones.kernels import cpu_kernels, resolve_kernels  # noqa: E402
from iared.evaluation.throughput import device_name, interleaved_times, steady_allocator  # noqa: E402
from iared.fileio import write_json  # noqa: E402
from iared.reduction.budgets import calibrate_knob  # noqa: E402


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


def measure(model, policy, image, kernels: str, rounds: int, warmup: int) -> dict[str, dict]:
    """{"original": row, "iared": row}: total, per-block and policy milliseconds, tokens per block."""
    policies = {"original": None, "iared": policy}
    stamps = {label: defaultdict(list) for label in policies}

    def forward(label):
        def run():
            with attached(model, policies[label]):
                modules = {f"block {i}": blk for i, blk in enumerate(model.blocks)}
                if policies[label] is not None:
                    modules["policy"] = policies[label]
                with stamping(modules, stamps[label]):
                    model(image, execution="compact")
        return run

    rows = {}
    with torch.inference_mode(), cpu_kernels(model, kernels), cpu_kernels(policy, kernels):
        # Round-robin, so both see the machine's same spells; the stamps keep the warm-up calls too.
        totals = interleaved_times({label: forward(label) for label in policies}, image.device, warmup, rounds)
        for label, st in stamps.items():
            with attached(model, policies[label]):
                _, info = model(image, return_info=True, execution="compact")
            row = {"total_ms": _median_ms(totals[label], 0), "block_tokens": info.block_tokens[0].tolist(),
                   "block_ms": [_median_ms(st[f"block {i}"], warmup) for i in range(len(model.blocks))]}
            if st["policy"]:
                calls = len(st["policy"]) // (warmup + rounds)  # policy calls per forward
                per_forward = [sum(st["policy"][r * calls:(r + 1) * calls]) for r in range(warmup + rounds)]
                row.update(policy_ms=_median_ms(per_forward, warmup), policy_calls=calls)
            rows[label] = row
    return rows


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
    image, calib = torch.randn(1, 3, *model.patch_embed.img_size), torch.randn(8, 3, *model.patch_embed.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "drops no token" until calibrated, the next line
        policy = iared.patch(model, "iared").policy
    with torch.no_grad():
        calibrate_knob(model, calib, args.keep_ratio)
    iared.unpatch(model)
    kinds = ["onednn"] + (["native"] if resolve_kernels("auto") == "native" else [])
    results = {k: measure(model, policy, image, k, args.rounds, args.warmup) for k in kinds}
    for k, r in results.items():
        o, i = r["original"], r["iared"]
        print(f"{k}: original {o['total_ms']:.2f} ms, IA-RED² {i['total_ms']:.2f} ms "
              f"(policy {i.get('policy_ms', 0):.2f} ms), speedup {o['total_ms'] / i['total_ms']:.2f}")
    out = Path(args.json or f"benchmarks/results/block_times_{args.arch}.json")
    write_json(out, {"command": shlex.join(["python", *sys.argv]), "arch": args.arch, "batch_size": 1,
                     "threads": torch.get_num_threads(), "allocator": allocator, "torch": torch.__version__,
                     "device_name": device_name("cpu"), "load_avg_1min": os.getloadavg()[0],
                     "keep_ratio_target": args.keep_ratio, "kernels": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
