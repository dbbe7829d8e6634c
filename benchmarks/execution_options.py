"""Which way of running a batch with per-image token counts is fastest on CPU?

The full model (DeiT-S shape by default, random weights) with a fixed test policy that
drops tokens in front of blocks 0, 4, 8: image b keeps r_b^((j+1)/3) of the grid at
stage j, r_b uniform in [--lo, --hi], so kept counts differ a lot between images.
Options (all give the same logits as mask mode, checked before timing):

  full           no token dropped (reference speed)
  padded         compact: batch cut to its longest image, padding masked as keys, every
                 layer runs on the padded (B, L_max) tensor
  per-block      per-token layers (qkv, proj, MLP) on the packed (T, C) valid tokens,
                 gathered and scattered back in every block, attention in buckets
  packed-1       packed from a group's first block to its last (`PackedLayout`, what
                 `VisionTransformer.forward_tokens` does); attention on one padded
                 (B, L_max) copy of q/k/v with a key mask
  packed-2       as packed-1, attention in 2 buckets of images of similar length
  packed-N       as packed-1, attention in up to N buckets
  packed         as packed-1, buckets as `length_buckets` sizes them (the default)
  nested         as packed-1, attention through jagged nested tensors (torch.nested)

Every option runs with the same linear-layer kernels (--kernels, oneDNN by default).

Timing: with --cpu-time, one thread and process CPU time (what a neighbour's load
disturbs least); otherwise wall time. Rounds interleave the options (fair under a neighbour's load); per option the
fastest round is reported, the closest to its uncontended speed on a shared machine.

    .venv/bin/python benchmarks/execution_options.py --batch-size 64
    .venv/bin/python benchmarks/execution_options.py --batch-size 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time

import torch
import torch.nn.functional as F

import iared
from iared.backbones import vit
from iared.backbones.kernels import cpu_kernels
from iared.evaluation.flops import vit_macs
from iared.evaluation.throughput import steady_allocator
from iared.backbones.tokens import Tokens, apply_keep
from iared.reduction.policy import TokenPolicy


class StagedKeep(TokenPolicy):
    """Test policy: in front of the given blocks, keep the given grid cells per image."""

    def __init__(self, grid_keep: dict[int, torch.Tensor]):
        super().__init__()
        self.grid_keep = grid_keep

    def acts_before(self, index: int) -> bool:
        return index in self.grid_keep

    def forward(self, index, tokens: Tokens, model, mode=None):
        if index not in self.grid_keep:
            return tokens, None
        keep = self.grid_keep[index].gather(1, tokens.pos.clamp(min=0))
        return apply_keep(tokens, keep), None


def staged_masks(B: int, G: int, blocks: list[int], lo: float, hi: float, seed: int = 1) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r = lo + (hi - lo) * torch.rand(B, generator=gen)
    rank = torch.rand(B, G, generator=gen).argsort(1).argsort(1)
    return {b: rank < (r[:, None] ** ((j + 1) / len(blocks)) * G).round() for j, b in enumerate(blocks)}


class PerBlock(vit.Block):
    """A block packed on its own: gathers and scatters its tokens itself (a packed run
    only takes plain `Block`s, so these never join one)."""

    def forward(self, tokens: Tokens) -> Tokens:
        return super().forward(tokens)


class NestedAttention(vit.Attention):
    """Packed attention through jagged nested tensors (torch.nested) instead of buckets."""

    def forward_packed(self, x, layout):
        T, D = x.shape
        images = torch.cat([b.images for b in layout.buckets])         # packed order of the images
        lens = layout.valid.index_select(0, images).sum(1)
        offsets = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
        qkv = self.qkv(x).view(T, 3, self.num_heads, self.head_dim)
        q, k, v = (torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets).transpose(1, 2)
                   for t in qkv.unbind(1))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).values()
        return self.proj(out.reshape(T, D))


def variant(name: str, model):
    """(model, forward keyword arguments) running option `name`: a copy of `model` whose
    blocks or attention are of another class, or `model` with another execution."""
    if name in ("full", "packed"):
        return model, {}
    if name == "padded":
        return model, {"execution": "padded"}
    m = copy.deepcopy(model)
    if name == "per-block":
        for blk in m.blocks:
            blk.__class__ = PerBlock
    elif name.startswith("packed-"):
        m.max_buckets = int(name.split("-")[1])
    elif name == "nested":
        for blk in m.blocks:
            blk.attn.__class__ = NestedAttention
    else:
        raise SystemExit(f"unknown option {name!r}")
    return m, {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="deit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lo", type=float, default=0.15)
    ap.add_argument("--hi", type=float, default=0.95)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--options", default="full,padded,per-block,packed-1,packed-2,packed,nested")
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernels", choices=("auto", "onednn", "aten"), default="auto",
                    help="linear-layer kernels for every option (iared.backbones.kernels)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="1 thread, process CPU time instead of wall time: robust to a loaded machine")
    ap.add_argument("--allocator", choices=("steady", "system"), default="steady",
                    help="as `iared bench speed --allocator` (iared.evaluation.throughput.steady_allocator)")
    args = ap.parse_args()
    allocator = steady_allocator() if args.allocator == "steady" else "system"
    torch.manual_seed(0)
    clock = time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
        clock = time.process_time
    model = iared.create_model(args.arch).eval()
    B, G = args.batch_size, model.grid_size
    every = len(model.blocks) // 3
    masks = staged_masks(B, G, [0, every, 2 * every], args.lo, args.hi)
    x = torch.randn(B, 3, *model.patch_embed.img_size)
    options = args.options.split(",")
    model.policy = StagedKeep(masks)
    variants = {name: variant(name, model) for name in options}  # copies made before packing weights
    with torch.inference_mode(), contextlib.ExitStack() as packed:
        for m in {id(m): m for m, _ in variants.values()}.values():
            kernels = packed.enter_context(cpu_kernels(m, args.kernels))
        _, info = model(x, return_info=True)
        ratio = float(vit_macs(torch.full_like(info.block_tokens, G + 1), model.embed_dim).sum()
                      / vit_macs(info.block_tokens, model.embed_dim).sum())
        ref = model(x, execution="mask")
        for name, (m, kw) in variants.items():
            if name != "full":
                err = (m(x, **kw) - ref).abs().max().item()
                print(f"{name}: max |logit diff| vs mask mode = {err:.1e}", flush=True)
        best = {name: float("inf") for name in options}
        for _ in range(args.rounds + 1):  # the first round is the warm-up
            for name, (m, kw) in variants.items():
                m.policy = None if name == "full" else StagedKeep(masks)
                t0 = clock()
                m(x, **kw)
                best[name] = min(best[name], clock() - t0) if _ else best[name]
    last = info.block_tokens[:, -1] - 1
    print(f"{args.arch} B={B} threads={torch.get_num_threads()} {kernels} kernels, allocator {allocator}; patch tokens at the last block "
          f"min/mean/max {int(last.min())}/{last.float().mean():.0f}/{int(last.max())}; "
          f"FLOPs ratio (blocks) {ratio:.3f}")
    rows = {}
    for name in options:
        ips = B / best[name]
        sp = ips / (B / best["full"]) if "full" in best else float("nan")
        limit = 1.0 if name == "full" else ratio  # "full" drops nothing: its own limit is 1
        rows[name] = {"img_per_s": round(ips, 2), "speedup": round(sp, 3), "of_limit": round(sp / limit, 3)}
        print(f"  {name:10s} {ips:8.2f} img/s  speedup {sp:.3f}  = {sp / limit:.2f} x the FLOPs limit", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "kernels": kernels, "allocator": allocator, "flops_ratio": ratio, "options": rows}, f, indent=1)


if __name__ == "__main__":
    main()
