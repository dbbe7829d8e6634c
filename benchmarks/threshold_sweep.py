"""Wall-clock time of grouped IA-RED² falling as the keep thresholds rise (issue 2).

DeiT-S shape, random weights, D = 3 interpreters. With random weights the scores have
no meaning, so each point of the sweep calibrates the thresholds (`calibrate_iared`) to
a target keep ratio r; a lower r means higher thresholds in every group. For each point
the script records the thresholds, the keep ratio on the timed batch, the counted
GFLOPs per image and the median forward time at batch 1 and 64 (compact execution).

    .venv/bin/python benchmarks/threshold_sweep.py
writes benchmarks/results/threshold_sweep.json (with the command).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch

import iared
from iared.evaluation.flops import count_flops
from iared.fileio import write_json
from iared.backbones.kernels import resolve_kernels
from iared.evaluation.throughput import measure_throughput, steady_allocator, synthetic_images
from iared.reduction.budgets import calibrate_iared, mean_keep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="deit_small_patch16_224")
    ap.add_argument("--keep-ratios", default="1.0,0.85,0.7,0.55,0.4")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/threshold_sweep.json")
    args = ap.parse_args()
    allocator = steady_allocator()  # as `iared bench speed`: no page faults for fresh buffers
    torch.manual_seed(0)
    model = iared.patch(iared.create_model(args.arch).eval(), policy="iared", groups=3)
    size = model.patch_embed.img_size[0]
    calib = synthetic_images(8, size, seed=1)
    batches = {b: synthetic_images(b, size, seed=0) for b in map(int, args.batch_sizes.split(","))}
    points = []
    for r in map(float, args.keep_ratios.split(",")):
        thresholds = calibrate_iared(model, calib, r)
        point = {"target_keep_ratio": r, "thresholds": thresholds}
        with torch.no_grad():
            point["gflops_per_img"] = float(count_flops(model, batches[min(batches)][:1]).mean()) / 1e9
        for b, images in batches.items():
            with torch.no_grad():
                _, info = model(images, return_info=True, execution="compact")
            ips = measure_throughput(model, images, warmup=1, repeats=args.repeats)
            point[f"b{b}"] = {"keep_ratio": float(mean_keep(info, 1).mean()), "img_per_s": ips,
                              "ms_per_batch": 1000.0 * b / ips}
        points.append(point)
        print(f"r={r:.2f} thresholds {[round(t, 4) for t in thresholds]} "
              + "  ".join(f"b{b}: {point[f'b{b}']['ms_per_batch']:.0f} ms" for b in batches), flush=True)
    write_json(args.out, {"command": shlex.join([".venv/bin/python"] + sys.argv), "arch": args.arch, "groups": 3,
                       "threads": torch.get_num_threads(), "kernels": resolve_kernels("auto"),
                       "allocator": allocator, "load_avg_1min": os.getloadavg()[0],
                       "points": points})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
