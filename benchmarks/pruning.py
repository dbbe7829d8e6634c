"""Weight pruning, token dropping and their greedy combination (IA-RED² paper, Fig. 5).

Needs a trained IA-RED² image model file (written by `iared train`). Without fine-tuning,
three accuracy-vs-reduction curves, the x axis being the reduction of the blocks' linear
layers' dense-equivalent multiply-adds (see `iared.evaluation.pruning`):

* pruning: magnitude pruning ratio up, every token kept (threshold 0);
* iared: the interpreters' keep threshold up, no pruning;
* greedy: from (0, 0), each step raises whichever knob loses less accuracy.

    .venv/bin/python benchmarks/pruning.py --checkpoint runs/X/iared/model.safetensors [--data SPEC]

Writes benchmarks/results/pruning.json and pruning.png.
"""

from __future__ import annotations

import argparse
import glob
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import iared  # noqa: E402
from iared.data import build_dataset  # noqa: E402
from iared.evaluation.pruning import TradeoffRunner  # noqa: E402
from iared.fileio import write_json  # noqa: E402
from iared.models import read_model_meta  # noqa: E402


def find_checkpoint() -> str | None:
    """The newest IA-RED² image model under runs/ (video models are skipped)."""
    found = []
    for path in glob.glob(str(ROOT / "runs" / "**" / "*.safetensors"), recursive=True):
        try:
            meta = read_model_meta(path)
        except Exception:
            continue
        if (meta.get("policy") or {}).get("name") == "iared" and "num_frames" not in (meta.get("data") or {}):
            found.append((Path(path).stat().st_mtime, path))
    return max(found)[1] if found else None


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, fmt, label in (("pruning", "s-", "weight pruning (magnitude)"), ("iared", "o-", "IA-RED² threshold"),
                            ("greedy", "^-", "greedy combination")):
        pts = out["curves"][key]
        ax.plot([100 * p["reduction"] for p in pts], [p["top1"] for p in pts], fmt, label=label, ms=4)
    ax.set_xlabel("FLOPs reduction of the blocks' linear layers (%)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{out['data']}, {out['n_images']} images, no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="IA-RED² model file (default: newest under runs/)")
    ap.add_argument("--data", default=None, help="KIND[:PATH] (default: the model file's data spec)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=1000, help="evaluation images (a fixed random subset)")
    ap.add_argument("--ratios", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8", help="pruning ratios")
    ap.add_argument("--thresholds", default="0,0.5,0.55,0.6,0.65,0.7,0.75,0.8,0.85,0.9", help="interpreter thresholds")
    ap.add_argument("--scope", default="global", choices=["global", "layer"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = args.checkpoint or find_checkpoint()
    if ckpt is None:
        print("pruning: no trained IA-RED² image model under runs/; pass --checkpoint", file=sys.stderr)
        return 2
    model = iared.load_model(ckpt)
    meta = model.model_meta.get("data") or {}
    data = args.data or meta.get("spec")
    if data is None:
        print("pruning: the model file names no data set; pass --data", file=sys.stderr)
        return 2
    kw = {k: tuple(meta[k]) for k in ("mean", "std") if k in meta}
    ds = build_dataset(data, args.split, **kw)
    n = min(args.limit, len(ds))
    index = sorted(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist())
    items = [ds[i] for i in index]
    images = torch.stack([it["image"] for it in items])
    labels = torch.tensor([it["label"] for it in items])
    t0 = time.time()
    runner = TradeoffRunner(model, images, labels, [float(r) for r in args.ratios.split(",")],
                            [float(t) for t in args.thresholds.split(",")], scope=args.scope)
    curves = {"pruning": runner.pruning_curve(), "iared": runner.token_curve(), "greedy": runner.greedy_curve()}
    out = {
        "command": shlex.join(["python", "benchmarks/pruning.py"] + list(sys.argv[1:] if argv is None else argv)),
        "checkpoint": ckpt, "data": data, "split": args.split, "n_images": n, "scope": args.scope,
        "notes": "No fine-tuning. reduction = 1 - (dense-equivalent multiply-adds of the blocks' qkv/proj/fc1/fc2, "
                 "each on the tokens entering its block, times 1 - sparsity) / (the same, dense, all tokens). "
                 "threshold 0 keeps every token. greedy: each step raises the knob whose next value has the "
                 "higher top-1 (ties: larger reduction).",
        "curves": curves, "seconds": time.time() - t0,
    }
    out_dir = Path(args.out)
    write_json(out_dir / "pruning.json", out)
    plot(out, out_dir / "pruning.png")
    print(f"wrote {out_dir / 'pruning.json'} and pruning.png in {out['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
