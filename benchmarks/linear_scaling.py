"""How a ViT block's linear layers and attention scale with the token count at batch 1.

For the four linear layers of a block (qkv, proj, fc1, fc2) at the widths of ViT-Tiny (192)
and DeiT-S (384), times one call on M tokens for M from 32 to 394, through PyTorch's default
kernels (`aten`) and oneDNN with the weight packed once (`onednn`, what `cpu_kernels` uses),
and fits time = fixed + per_token * M by least squares. The fixed part is what no token
policy can remove: a block that keeps 60 % of its tokens saves 40 % of the per-token part
only. Attention (`sdpa`: PyTorch's CPU kernel on the block's q, k, v views, heads of 64) is
timed the same way: its multiply-adds grow with M², so a time that grows about linearly in
M means fewer tokens save less time than FLOPs. Writes
`benchmarks/results/linear_scaling.json` with the command.

    .venv/bin/python benchmarks/linear_scaling.py        # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from iared.evaluation.throughput import device_name
from iared.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
TOKENS = (32, 64, 88, 118, 156, 197, 256, 394)
WIDTHS = {"vit_tiny (192)": 192, "deit_small (384)": 384}


def median_us(fn: Callable[[], object], rounds: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def fit(ms: list[int], us: list[float]) -> dict[str, float]:
    slope, fixed = np.polyfit(np.asarray(ms, float), np.asarray(us, float), 1)
    return {"fixed_us": float(fixed), "per_token_us": float(slope)}


def report(name: str, row: dict[str, dict]) -> None:
    print(f"{name}: " + ", ".join(f"{kernels} fixed {v['fixed_us']:.0f} us + {v['per_token_us']:.2f} us/token"
                                  for kernels, v in row.items()), file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=300, help="timed calls per point (median)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out: dict[str, dict] = {}
    with torch.inference_mode():
        for label, d in WIDTHS.items():
            for layer, (k, n) in {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}.items():
                w, b = torch.randn(n, k), torch.randn(n)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
                row: dict[str, dict] = {}
                for kernels in ("aten", "onednn"):
                    us = []
                    for m in TOKENS:
                        x = torch.randn(m, k)
                        call = (lambda: F.linear(x, w, b)) if kernels == "aten" else \
                            (lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""))
                        us.append(median_us(call, args.rounds))
                    row[kernels] = {"us": dict(zip(map(str, TOKENS), us)), **fit(list(TOKENS), us)}
                out[f"{label} {layer}"] = row
                report(f"{label} {layer}", row)
            heads, us = d // 64, []
            for m in TOKENS:
                q, k, v = torch.randn(1, m, 3, heads, 64).permute(2, 0, 3, 1, 4)  # as `Attention.qkv_heads`
                us.append(median_us(lambda: F.scaled_dot_product_attention(q, k, v), args.rounds))
            out[f"{label} attention"] = row = {"sdpa": {"us": dict(zip(map(str, TOKENS), us)), **fit(list(TOKENS), us)}}
            report(f"{label} attention", row)
    write_json(ROOT / "benchmarks" / "results" / "linear_scaling.json", {
        "command": shlex.join(["python", "benchmarks/linear_scaling.py"] + list(sys.argv[1:] if argv is None else argv)),
        "device_name": device_name("cpu"), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "tokens": list(TOKENS),
        "notes": "median of --rounds calls per point; fixed_us + per_token_us * M is the least-squares line",
        "layers": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
