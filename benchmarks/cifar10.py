"""CIFAR-10 reference task: the accuracy-vs-cost trade-off where redundancy is low.

CIFAR-10 images are 32×32 natural photos whose object fills most of the frame, so
unlike the cluttered data there is little background to drop: the question is how much
each method loses as it keeps fewer tokens. Small budget (about 30 min on 2 CPU cores):

1. backbone: a 6-block, width-64 ViT with 4×4 patches (64 tokens), trained from scratch
   (`iared.training.backbone.train_backbone`, random flips, AdamW, cosine schedule), or
   `--backbone PATH`;
2. IA-RED² with D = 3 by the curriculum (`iared.training.curriculum.train_iared`),
   interpreters only (the paper's Table 2 setting), or `--model PATH`;
3. original / random / attention / IA-RED² / ATS / top-K with every baseline's budget
   matched to IA-RED²'s GFLOPs on a budget sweep of each method (also the trade-off plot).

Writes `benchmarks/results/cifar10.json` (with the exact command) and, under `--out`,
the models, `tradeoff.png` and a copy of the JSON. Finished stages under `--out` are
reused and the training stages resume from their checkpoints.

    .venv/bin/python benchmarks/cifar10.py            # about 30 min on 2 CPU cores
    .venv/bin/python benchmarks/cifar10.py --quick    # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from iared.commands.sweep import budget_sweep, matched_eval, matched_headline
from iared.evaluation.report import save_tradeoff_plot
from iared.commands.eval import EvalConfig
from iared.fileio import write_json
from iared.models import load_model
from iared.training.backbone import BackboneOptions, train_backbone
from iared.training.curriculum import TrainOptions, train_iared

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10_jpg"
METHODS = ("original", "random", "attention", "iared", "ats", "topk")
# Eq. 2's tau trades accuracy for tokens. With tau = 1 the expected reward of keeping everything
# is only -(1 - acc), about -0.3 for this backbone (66 % test top-1), so the interpreters dropped
# to 5 % of the tokens at 34.7 % top-1 (worse than random dropping); CIFAR-10 has little
# redundancy and needs a costlier mistake.
TAU = 4.0


@dataclass(frozen=True)
class Budget:
    """Steps and sizes of one run."""

    backbone_epochs: float      # "epochs" of `backbone_steps` steps (a fresh random subset each)
    backbone_steps: int         # steps per backbone epoch, batch 64
    iared_epochs: float         # curriculum epochs per group (interpreters only)
    iared_steps: int            # steps per curriculum epoch
    val_size: int               # validation images after each epoch
    eval_images: Optional[int]  # first N test images (None: all 10000; the test files are sorted by
                                # class, so a prefix holds few classes: use all for a result)
    flops_images: int           # images whose FLOPs are counted
    sweep: dict                 # method -> budget knob values


FULL = Budget(backbone_epochs=60, backbone_steps=150, iared_epochs=6, iared_steps=100, val_size=1000,
              eval_images=None, flops_images=16,
              sweep={"iared": (0.3, 0.4, 0.6, 0.8), "ats": (0.3, 0.6, 0.9), "topk": (0.3, 0.6, 0.9),
                     "random": (0.3, 0.6, 0.9), "attention": (0.3, 0.6, 0.9)})
QUICK = Budget(backbone_epochs=1, backbone_steps=4, iared_epochs=1, iared_steps=2, val_size=64, eval_images=64,
               flops_images=4, sweep={"iared": (0.3, 0.7), "ats": (0.3, 0.9), "topk": (0.3, 0.9),
                                      "random": (0.3, 0.9), "attention": (0.3, 0.9)})


def log(msg: str) -> None:
    print(f"[cifar10] {msg}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder (or zip) of cifar10 JPEGs")
    ap.add_argument("--out", default=None, help="run folder (default runs/cifar10[_quick])")
    ap.add_argument("--json", default=None, help="results JSON (default benchmarks/results/cifar10.json; "
                                                 "--quick: OUT/results.json)")
    ap.add_argument("--backbone", default=None, help="use this trained backbone model file")
    ap.add_argument("--model", default=None, help="use this trained IA-RED² model file (skips training)")
    ap.add_argument("--quick", action="store_true", help="tiny training and few images: a smoke run")
    ap.add_argument("--tau", type=float, default=TAU,
                    help=f"penalty of a wrong prediction in the reward, Eq. 2 (default {TAU})")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    budget = QUICK if args.quick else FULL
    t0 = time.time()
    out = Path(args.out or ("runs/cifar10_quick" if args.quick else "runs/cifar10"))
    json_path = Path(args.json) if args.json else (out / "results.json" if args.quick
                                                    else ROOT / "benchmarks" / "results" / "cifar10.json")
    data = f"cifar10:{args.data_dir}"
    command = shlex.join([".venv/bin/python", "benchmarks/cifar10.py", *argv])
    progress = sys.stderr.isatty()

    backbone = Path(args.backbone) if args.backbone else out / "backbone" / "model.safetensors"
    if not args.model and not backbone.is_file():
        log("training the backbone")
        train_backbone(BackboneOptions(
            data=data, arch="vit_custom", out=str(backbone.parent), embed_dim=64, depth=6, num_heads=4, patch_size=4,
            epochs=budget.backbone_epochs, batch_size=64, lr=1e-3, weight_decay=0.05, warmup_epochs=0.3,
            label_smoothing=0.1, hflip=True, limit_batches=budget.backbone_steps, val_size=budget.val_size,
            checkpoint_every=50, seed=args.seed, device=args.device, resume=True, progress=progress))
    model_path = Path(args.model) if args.model else out / "iared" / "model.safetensors"
    if not model_path.is_file():
        log("training IA-RED² (D = 3, interpreters only)")
        train_iared(TrainOptions(
            data=data, checkpoint=str(backbone), out=str(model_path.parent), groups=3, epochs=budget.iared_epochs,
            schedule=(1.0, 0.0), finetune=False, tau=args.tau, lr=1e-3, batch_size=64, limit_batches=budget.iared_steps,
            val_size=budget.val_size, checkpoint_every=25, seed=args.seed, device=args.device, resume=True,
            progress=progress))
    t_train = time.time() - t0

    base = EvalConfig(data=data, checkpoint=str(model_path), split="test", batch_size=64,
                      limit_images=budget.eval_images, flops_images=budget.flops_images, device=args.device,
                      seed=args.seed, command=command, progress=progress)
    n_eval = budget.eval_images or "all"
    log(f"budget sweep on {n_eval} test images")
    sweep, iared_point = budget_sweep(base, budget.sweep)
    log(f"methods at IA-RED²'s cost ({iared_point['gflops_per_img']:.4f} GFLOPs/img)")
    results = matched_eval(base, sweep, iared_point["gflops_per_img"], methods=METHODS, segmentation=False)
    out.mkdir(parents=True, exist_ok=True)
    save_tradeoff_plot(sweep, out / "tradeoff.png", matched=results["methods"],
                       title="CIFAR-10: accuracy vs cost (hollow: budgets matched to IA-RED²)")

    meta = load_model(model_path).model_meta or {}
    doc = {
        "task": "cifar10", "command": command, "data": "cifar10", "checkpoint": str(model_path),
        "backbone": None if args.model else str(backbone), "iared_train": meta.get("extra"),
        "quick": args.quick, "device": args.device, "threads": torch.get_num_threads(),
        "eval_images": budget.eval_images or 10000,
        "note": (f"Matched cost: every baseline's budget set to IA-RED²'s GFLOPs; {n_eval} test images."
                 + (" Quick smoke run: tiny training on the first test images (one class), not a result."
                    if args.quick else "")),
        "methods": results["methods"], "matched_to": results["matched_to"], "notes": results.get("notes"),
        "sweep": sweep, "train_wall_s": t_train, "wall_s": time.time() - t0,
    }
    for path in dict.fromkeys([json_path, out / "results.json"]):  # the run folder keeps a copy
        write_json(path, doc)
    log(f"done in {doc['wall_s'] / 60:.1f} min -> {json_path}: {matched_headline(doc['methods'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
