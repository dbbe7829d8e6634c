"""What each step of the demo's backbone recipe gives: patch overlap and training length.

Trains the demo's ViT (6 blocks, width 64, patch 6: 64 tokens) on cluttered-digits with the
demo's schedule (AdamW 1e-3, label smoothing 0.1, clutter ramp 0/2/4 fragments over the first
30 epochs), varying one thing at a time, and measures each on the 1080 validation and 1080
test canvases. Writes `benchmarks/results/demo_backbone.json` with the exact commands; each
run's model stays under `--out` and is reused when this script runs again.

    .venv/bin/python benchmarks/demo_backbone.py      # four runs, about 15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from iared.data import build_dataset
from iared.evaluation.accuracy import evaluate, standard_error
from iared.fileio import write_json
from iared.models import load_model

ROOT = Path(__file__).resolve().parents[1]
RAMP = ",".join(["0"] * 10 + ["2"] * 10 + ["4"] * 10)
# name -> (patch overlap, epochs); the last is `iared demo`'s recipe.
VARIANTS = {"patch6_60ep": (0, 60), "overlap2_60ep": (2, 60), "patch6_90ep": (0, 90), "overlap2_90ep": (2, 90)}


def train_command(out: Path, overlap: int, epochs: int) -> list[str]:
    return [sys.executable, "-m", "iared.cli", "train-backbone", "--data", "cluttered-digits", "--arch", "vit_custom",
            "--out", str(out), "--embed-dim", "64", "--depth", "6", "--heads", "4", "--patch-size", "6",
            "--patch-overlap", str(overlap), "--epochs", str(epochs), "--batch-size", "64", "--lr", "1e-3",
            "--clutter-ramp", RAMP, "--val-every", "10", "--checkpoint-every", "50", "--seed", "0", "--device", "cpu", "--no-progress"]


def top1(model_path: Path, split: str) -> dict[str, Any]:
    model = load_model(model_path).eval()
    data = build_dataset("cluttered-digits", split, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=256)
    r = evaluate(model, loader)
    return {"top1": r["top1"], "top1_se": standard_error(r["top1"], r["n"]), "n": r["n"]}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo_backbone", help="run folder")
    p.add_argument("--only", default=None, help="comma-separated variant names")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    results: dict[str, Any] = {}
    for name in names:
        overlap, epochs = VARIANTS[name]
        out = Path(args.out) / name
        cmd = train_command(out, overlap, epochs)
        t = time.time()
        if not (out / "model.safetensors").is_file():
            print(f"[demo_backbone] {name}", file=sys.stderr, flush=True)
            subprocess.run(cmd + (["--resume"] if out.exists() else []), check=True, cwd=ROOT)
        results[name] = {"patch_overlap": overlap, "epochs": epochs, "train_wall_s": round(time.time() - t, 1),
                         "command": shlex.join(["python"] + cmd[1:]),
                         "val": top1(out / "model.safetensors", "val"), "test": top1(out / "model.safetensors", "test")}
        print(f"[demo_backbone] {name}: val {results[name]['val']['top1']:.2f}, "
              f"test {results[name]['test']['top1']:.2f}", file=sys.stderr, flush=True)
    write_json(ROOT / "benchmarks" / "results" / "demo_backbone.json", {
        "command": shlex.join(["python", "benchmarks/demo_backbone.py"] + (argv if argv is not None else sys.argv[1:])),
        "threads": torch.get_num_threads(),
        "notes": {"train_wall_s": "0 when the model was already trained under --out",
                  "top1_se": "binomial standard error, in points"},
        "variants": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
