"""The real ImageNet ViT-Tiny, training-free: ATS, top-K, random, attention, ToMe and EViT.

The model is what a user holds: timm's `vit_tiny_patch16_224` with the augreg ImageNet-1k
weights of ../shared/models, handed to `iared.patch` (converted into our backbone, weights
shared). Images are ../shared/data/imagenet_val_subset (650 ImageNet validation photos,
1000 classes), preprocessed by the model's own `pretrained_cfg` (timm's eval transform:
bicubic, crop_pct 0.9, mean = std = 0.5), so "original" is timm's published subset
accuracy. For every method and budget: top-1 / top-5 with their standard error, GFLOPs
per image (counted one image at a time), keep ratio per stage, the histogram of kept
tokens K' per stage (ATS, top-K), and measured img/s at batch 64 and batch 1 (every
method timed round-robin on the same images, oneDNN linears). Accuracy at matched cost
(1.3x, 1.5x, 2x fewer GFLOPs) is read off each family's curve by linear interpolation.

    .venv/bin/python benchmarks/imagenet.py [--limit N] [--shared ../shared]     # about 10 min

Writes benchmarks/results/imagenet_vit_tiny.json, imagenet_vit_tiny_tradeoff.png (top-1
against GFLOPs and against measured speedup) and imagenet_vit_tiny_kept.png (the patches
each method keeps on 8 photos). IA-RED², whose interpreters are trained on this model
(Algorithm 1), is measured beside these rows by benchmarks/imagenet_iared.py.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from iared.data import build_dataset  # noqa: E402
from iared.evaluation.figures import denormalize, kept_grid, save_figure  # noqa: E402
from iared.commands.compare import compare_methods  # noqa: E402
from iared.commands.eval import MethodSpec, build_method  # noqa: E402
from iared.backbones.kernels import resolve_kernels  # noqa: E402
from iared.evaluation.throughput import device_name, steady_allocator  # noqa: E402
from iared.fileio import write_json  # noqa: E402

ARCH = "vit_tiny_patch16_224"
CHECKPOINT = "models/vit_tiny_patch16_224_augreg_in1k.safetensors"
DATA = "data/imagenet_val_subset"

# Budgets spanning about 1.2x-2.5x fewer GFLOPs. ATS and top-K: K = round(rho * 197) at
# each of blocks 3-11 (rho = 1: K = 197, the paper's setting; rho > 1 samples more points
# than there are tokens, a milder reduction); ATS keeps the distinct tokens its K samples
# hit, so it keeps fewer than K. Single-stage ATS: block 3 with the paper's K values.
METHODS = (
    [MethodSpec("original", "original")]
    + [MethodSpec(f"ats@{r}", "ats", {"rho": r}) for r in (2.0, 1.5, 1.0, 0.87, 0.72, 0.5)]
    # The other reading of Appendix E.1: K_n = rho * tokens entering stage n (compounds).
    + [MethodSpec("ats@compound=true", "ats", {"compound": True})]
    + [MethodSpec(f"ats_single@K={k}", "ats_single", {"K": k}) for k in (108, 78, 48)]
    + [MethodSpec(f"topk@{r}", "topk", {"rho": r}) for r in (0.8, 0.6, 0.45, 0.3, 0.2)]
    + [MethodSpec(f"random@{k}", "random", {"keep_ratio": k}) for k in (0.8, 0.65, 0.5, 0.4)]
    + [MethodSpec(f"attention@{k}", "attention", {"keep_ratio": k}) for k in (0.8, 0.65, 0.5, 0.4)]
    + [MethodSpec(f"tome@{r}", "tome", {"r": r}) for r in (4, 8, 12, 16)]
    + [MethodSpec(f"evit@{k}", "evit", {"keep_rate": k}) for k in (0.9, 0.7, 0.5)]
)
MATCHED_COST = (1.3, 1.5, 2.0)          # x fewer GFLOPs at which each curve is read
KEPT_FIGURE = ("ats@1.0", "ats_single@K=78", "topk@0.6", "random@0.65", "attention@0.65", "evit@0.7")
HIST_BIN = 8                            # K' histogram bin width (tokens)


def family(label: str) -> str:
    return "ats_compound" if "compound" in label else label.split("@")[0]


def load_model(shared: Path) -> torch.nn.Module:
    """timm's model with the real weights, converted into our backbone (weights shared), no policy."""
    import timm
    from safetensors.torch import load_file

    from iared.integrations.timm import from_timm

    timm_model = timm.create_model(ARCH, pretrained=False)
    timm_model.load_state_dict(load_file(shared / CHECKPOINT))
    return from_timm(timm_model)  # what `iared.patch(timm_model, ...)` does first; rows attach their policy


def load_images(shared: Path, cfg: dict, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every photo decoded once through the model's eval transform: (n, 3, H, W), (n,), class names."""
    ds = build_dataset(f"imagefolder:{shared / DATA}", "test", preprocess=cfg)
    n = len(ds) if limit is None else min(limit, len(ds))
    items = [ds[i] for i in range(n)]
    return (torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items]),
            list(ds.info.class_names))


def measure(rows, images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace,
            grid_size: int) -> tuple[dict, dict]:
    """Accuracy, GFLOPs, keep ratios and img/s at batch `args.batch_size` and 1 of each row.

    Args:
        rows: (label, model with its policy attached) pairs; "original" among them.
        images, labels: the evaluation photos, preprocessed.
        args: batch_size, flops_images, repeats, repeats_b1.
        grid_size: patch tokens of the full grid (for the K' histograms).

    Returns:
        ({label: results row}, {label: (model, {})} for later figures).
    """
    n = int(labels.shape[0])
    loader = [{"image": images[i:i + args.batch_size], "label": labels[i:i + args.batch_size]}
              for i in range(0, n, args.batch_size)]
    rows = [(label, m.eval()) for label, m in rows]
    results = compare_methods(
        rows, loader, images[:args.flops_images], speed_batches=(images[:args.batch_size], images[:1]),
        repeats=(args.repeats, args.repeats_b1), warmup=2,
        counts_for=lambda label: family(label) in ("ats", "ats_compound", "ats_single", "topk"),
        log=lambda line: print(line, flush=True))
    bins = grid_size // HIST_BIN + 1
    for r in results.values():
        r[f"img_per_s_b{args.batch_size}"] = r["img_per_s"]
        counts = r.pop("stage_counts", None)
        if counts is not None:  # K' (patch tokens kept) per stage: histogram in bins of HIST_BIN tokens
            r["kept_tokens_hist"] = {str(b): torch.bincount(c // HIST_BIN, minlength=bins).tolist()
                                     for b, c in zip(r["stage_blocks"], counts)}
    return results, {label: (m, {}) for label, m in rows}


def run(args: argparse.Namespace) -> dict:
    shared = Path(args.shared).resolve()
    model = load_model(shared)
    cfg = model.pretrained_cfg
    t0 = time.time()
    images, labels, class_names = load_images(shared, cfg, args.limit)
    n = int(labels.shape[0])
    print(f"loaded {n} photos in {time.time() - t0:.1f}s ({cfg['interpolation']}, crop_pct {cfg['crop_pct']})",
          flush=True)
    rows = [(spec.label, build_method(model, spec, seed=0)) for spec in METHODS]
    results, models = measure(rows, images, labels, args, model.grid_size)
    kept = kept_masks(models, images[:args.figure_images])
    models.clear()
    return {"arch": ARCH, "checkpoint": CHECKPOINT, "data": DATA, "n_images": n,
            "preprocessing": {k: cfg[k] for k in ("input_size", "interpolation", "crop_pct", "mean", "std")},
            "methods": results, "matched_cost": matched_cost(results), "hist_bin": HIST_BIN,
            "_kept": kept, "_grid": tuple(model.patch_embed.grid_size),
            "_figure_images": [denormalize(x, cfg["mean"], cfg["std"]) for x in images[:args.figure_images]],
            "_figure_labels": [class_names[int(y)] for y in labels[:args.figure_images]]}


def kept_masks(models: dict, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The patches alive after the last stage, (n, G) per method of `KEPT_FIGURE`."""
    out = {}
    with torch.inference_mode():
        for label in KEPT_FIGURE:
            _, info = models[label][0](images, return_info=True)
            out[label] = info.stages[-1].keep.reshape(images.shape[0], -1).cpu()
    return out


def interpolate(points: list[tuple[float, float]], x: float):
    """y of a (x, y) curve at x, linearly; None outside the curve's range."""
    pts = sorted(points)
    if len(pts) < 2 or not pts[0][0] - 1e-9 <= x <= pts[-1][0] + 1e-9:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def matched_cost(results: dict, costs=MATCHED_COST) -> dict:
    """{family: {"1.3x": top-1 at 1.3x fewer GFLOPs, ..., "speedup_1.3x": ... measured at batch 64}}."""
    out = {}
    for fam in dict.fromkeys(family(k) for k in results if k != "original"):
        rows = [r for k, r in results.items() if family(k) == fam]
        out[fam] = {}
        for c in costs:
            out[fam][f"{c}x"] = interpolate([(r["flops_ratio"], r["top1"]) for r in rows], c)
            out[fam][f"speedup_{c}x"] = interpolate([(r["speedup"], r["top1"]) for r in rows], c)
    return out


STYLES = {"ats": ("C0", "o-"), "ats_compound": ("C7", "x"), "ats_single": ("C6", "v--"), "topk": ("C1", "s-"),
          "random": ("C2", "^-"), "attention": ("C3", "d-"), "tome": ("C4", "P-"), "evit": ("C5", "X-")}


def plot(out: dict, path: Path, styles: dict | None = None, title: str | None = None) -> None:
    """Top-1 against GFLOPs, measured speedup at batch 64 and at batch 1, one curve per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = out["methods"]
    styles = styles or STYLES
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    for ax, key, xlabel in ((axes[0], "gflops_per_img", "GFLOPs per image (multiply-adds, counted)"),
                            (axes[1], "speedup", f"measured speedup, batch {out['batch_size']}"),
                            (axes[2], "speedup_b1", "measured speedup, batch 1")):
        o = res["original"]
        for fam, (color, fmt) in styles.items():
            pts = sorted((r[key], r["top1"], r["top1_se"]) for lab, r in res.items() if family(lab) == fam)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=fmt,
                            color=color, label=fam, ms=5, capsize=2)
        ax.plot([o[key]], [o["top1"]], "k*", ms=13, label="original")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].invert_xaxis()  # cheaper to the right, as speedup grows to the right
    axes[0].set_ylabel(f"top-1 % on {out['n_images']} ImageNet val photos (± 1 s.e.)")
    axes[2].legend(fontsize=8, loc="lower left")
    fig.suptitle(title or f"{out['arch']} (timm, augreg in1k) via iared.patch, training-free token reduction; "
                 f"{out['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared data/models folder")
    ap.add_argument("--limit", type=int, default=None, help="only the first N photos (default: all 650)")
    ap.add_argument("--batch-size", type=int, default=64, help="evaluation and throughput batch")
    ap.add_argument("--flops-images", type=int, default=16, help="GFLOPs averaged over the first N photos")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds at --batch-size")
    ap.add_argument("--repeats-b1", type=int, default=40, help="timed rounds at batch 1")
    ap.add_argument("--figure-images", type=int, default=8, help="photos in the kept-patches figure")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    for rel in (CHECKPOINT, DATA):
        if not (shared / rel).exists():
            print(f"imagenet: {shared / rel} not found (needs ../shared, or --shared)", file=sys.stderr)
            return 2
    try:
        import timm  # noqa: F401
    except ImportError:
        print("imagenet: needs timm (pip install 'iared[timm]')", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    allocator = steady_allocator()  # before anything is allocated, as `iared bench speed`
    t0 = time.time()
    out = run(args)
    import timm

    out.update({
        "command": shlex.join(["python", "benchmarks/imagenet.py"] + list(sys.argv[1:] if argv is None else argv)),
        "batch_size": args.batch_size, "device": "cpu", "device_name": f"{device_name('cpu')}, "
        f"{torch.get_num_threads()} threads", "threads": torch.get_num_threads(),
        "kernels": resolve_kernels("auto", "cpu"), "allocator": allocator,
        "torch": torch.__version__, "timm": timm.__version__, "wall_s": time.time() - t0,
        "notes": (f"No training or fine-tuning: every policy is plugged into the pretrained model. top1_se = binomial "
                  f"standard error. gflops_per_img = multiply-adds / 1e9 counted one image at a time on the first "
                  f"{args.flops_images} photos. img_per_s_b64 / img_per_s_b1: median of {args.repeats} / "
                  f"{args.repeats_b1} rounds, every method timed once per round on the same images (the first "
                  f"64 photos / the first one). ats/topk@rho: multi-stage (blocks 3-11), K = max(round(rho * 197), 8) "
                  f"at every stage; ats_single@K: block 3 only; random/attention@k: drop at the input, keep ratio k; "
                  f"tome@r: r tokens merged per block; evit@k: keep rate k at blocks 3, 6, 9, the rest fused into one "
                  f"token. kept_tokens_hist: per stage block, images per bin of {HIST_BIN} kept patch tokens. "
                  f"matched_cost: top-1 of each family's curve at 1.3/1.5/2x fewer GFLOPs (or measured batch-64 "
                  f"speedup), linearly interpolated; null outside the curve's range."),
    })
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = out_dir / "imagenet_vit_tiny_tradeoff.png"
    plot(out, fig)
    out["figure"] = fig.name
    kept_png = out_dir / "imagenet_vit_tiny_kept.png"
    save_figure(kept_grid(out.pop("_figure_images"), out.pop("_kept"), out.pop("_grid"), out.pop("_figure_labels"),
                          title=f"{ARCH}: patches alive after the last stage (corner: kept fraction)"), kept_png)
    out["figure_kept"] = kept_png.name
    write_json(out_dir / "imagenet_vit_tiny.json", out)
    print(f"wrote {out_dir / 'imagenet_vit_tiny.json'} and {fig} in {out['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
