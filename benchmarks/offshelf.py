"""Off-the-shelf: ATS, top-K, random and attention dropping plugged into pretrained ViTs.

No training: the two foreign checkpoints of ../shared/models are loaded by the project's
loaders, and each method is attached with `iared.patch` at several budgets. For each we
measure top-1/top-5 on the real test set, GFLOPs per image (counted, one image at a time,
on the first --flops-images images) and keep ratios, and compare the methods at equal
GFLOPs by linear interpolation of each curve. Also the histogram of ATS's K' per stage
(the ATS paper's Fig. 6).

    .venv/bin/python benchmarks/offshelf.py [--limit N] [--shared ../shared]

Writes benchmarks/results/offshelf.json, offshelf_tradeoff.png and offshelf_kprime_<model>.png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import iared  # noqa: E402
from iared.data import build_dataset  # noqa: E402
from iared.commands.compare import compare_methods  # noqa: E402
from iared.commands.eval import MethodSpec, build_method  # noqa: E402
from iared.fileio import write_json  # noqa: E402

MODELS = {
    # name: (arch, checkpoint file, data spec relative to shared/, normalisation of the checkpoint)
    "vit_mnist": ("vit_mnist_patch7_28", "models/vit_mnist_gauravpbhagwat.pth", "mnist:{shared}/data/mnist",
                  {}),  # the data set's default is MNIST's (0.1307, 0.3081), as the model was trained
    "vit_tiny8_cifar10": ("vit_tiny8_patch4_32", "models/vit_tiny8_cifar10_yihsiu7893.pt",
                          "cifar10:{shared}/data/cifar10_jpg/cifar10_jpg_test.zip",
                          {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}),  # trained on raw [0, 1] pixels
}
RHOS = [1.0, 0.87, 0.72, 0.5, 0.3, 0.15]
KEEPS = [0.9, 0.7, 0.5, 0.35, 0.2]
SINGLE_FRACTIONS = [0.75, 0.5, 0.3, 0.15]   # single-stage K as a fraction of N + 1
HIST_RHO = 0.87


def methods_for(model: torch.nn.Module) -> list[MethodSpec]:
    n1 = model.grid_size + 1
    # The paper's floor K >= 8 is for 197 tokens; on 17 or 65 tokens it would stop every curve at
    # half the tokens, so the floor is scaled with the token count (ATS and top-K alike).
    min_k = max(1, round(8 * n1 / 197))
    specs = [MethodSpec("original", "original")]
    specs += [MethodSpec(f"ats@{r}", "ats", {"rho": r, "min_k": min_k}) for r in RHOS]
    specs += [MethodSpec(f"topk@{r}", "topk", {"rho": r, "min_k": min_k}) for r in RHOS]
    ks = sorted({max(1, int(round(f * n1))) for f in SINGLE_FRACTIONS}, reverse=True)
    specs += [MethodSpec(f"ats_single@K={k}", "ats_single", {"K": k}) for k in ks]
    specs += [MethodSpec(f"random@{k}", "random", {"keep_ratio": k}) for k in KEEPS]
    specs += [MethodSpec(f"attention@{k}", "attention", {"keep_ratio": k}) for k in KEEPS]
    return specs


def family(label: str) -> str:
    return label.split("@")[0]


def interp_at(curve: list[tuple[float, float]], g: float):
    """Accuracy of a (gflops, top1) curve at `g` by linear interpolation; None outside its range."""
    pts = sorted(curve)
    xs = [p[0] for p in pts]
    if not pts or g < xs[0] - 1e-12 or g > xs[-1] + 1e-12:
        return None
    return float(np.interp(g, xs, [p[1] for p in pts]))


def run_model(key: str, shared: Path, limit: int, flops_images: int, batch_size: int) -> dict:
    arch, ckpt, spec, norm = MODELS[key]
    data = spec.format(shared=shared)
    model = iared.load_pretrained(iared.create_model(arch), shared / ckpt).eval()
    ds = build_dataset(data, "test", **norm)
    n = len(ds) if limit is None else min(limit, len(ds))
    t0 = time.time()
    # A fixed random subset: the test files are ordered by class, so the first n would not do.
    index = sorted(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist())
    items = [ds[i] for i in index]  # decode once; every method reads the same tensors
    images = torch.stack([it["image"] for it in items])
    labels = torch.tensor([it["label"] for it in items])
    print(f"[{key}] loaded {n} test images in {time.time() - t0:.1f}s", flush=True)
    loader = [{"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}
              for i in range(0, n, batch_size)]
    rows = ((m_spec.label, build_method(model, m_spec, seed=0)) for m_spec in methods_for(model))
    results = compare_methods(rows, loader, images[:flops_images], counts_for=lambda label: label == f"ats@{HIST_RHO}",
                              progress=False, log=lambda line: print(f"[{key}] {line}", flush=True))
    hist = {}
    for r in results.values():
        counts = r.pop("stage_counts", None)
        if counts is not None:
            hist = {str(b): c.tolist() for b, c in zip(r["stage_blocks"], counts)}
    ref = results["original"]["gflops_per_img"]

    # Equal-GFLOPs comparison: at each multi-stage ATS point, the other curves interpolated.
    curves: dict[str, list[tuple[float, float]]] = {}
    for label, r in results.items():
        if family(label) != "original":
            curves.setdefault(family(label), []).append((r["gflops_per_img"], r["top1"]))
    for fam in curves:  # every reduction curve ends at the unreduced model
        curves[fam].append((ref, results["original"]["top1"]))
    comparison = []
    for label, r in results.items():
        if family(label) != "ats":
            continue
        row = {"ats": label, "gflops_per_img": r["gflops_per_img"], "ats_top1": r["top1"]}
        for fam in ("topk", "ats_single", "random", "attention"):
            row[f"{fam}_top1"] = interp_at(curves[fam], r["gflops_per_img"])
        comparison.append(row)
    return {"arch": arch, "checkpoint": ckpt, "data": data, "n_images": n, "flops_images": flops_images,
            "methods": results, "equal_gflops": comparison, "ats_kprime_hist": {"rho": HIST_RHO, "counts": hist},
            "grid_size": model.grid_size}


def plot(out: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    keys = list(out["models"])
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5))
    styles = {"ats": ("C0", "o-"), "ats_single": ("C4", "v--"), "topk": ("C1", "s-"), "random": ("C2", "^-"),
              "attention": ("C3", "d-")}
    for ax, key in zip(np.atleast_1d(axes), keys):
        res = out["models"][key]["methods"]
        for fam, (color, fmt) in styles.items():
            pts = sorted((r["gflops_per_img"] * 1e3, r["top1"]) for lab, r in res.items() if family(lab) == fam)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], fmt, color=color, label=fam, ms=4)
        o = res["original"]
        ax.plot([o["gflops_per_img"] * 1e3], [o["top1"]], "k*", ms=12, label="original")
        ax.set_xlabel("MFLOPs per image (multiply-adds, counted)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{key} ({out['models'][key]['n_images']} test images), no fine-tuning")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "offshelf_tradeoff.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    for key in keys:
        hist = out["models"][key]["ats_kprime_hist"]["counts"]
        G = out["models"][key]["grid_size"]
        fig, axes = plt.subplots(1, len(hist), figsize=(3.2 * len(hist), 3), sharey=True)
        for ax, (block, counts) in zip(np.atleast_1d(axes), hist.items()):
            ax.hist(counts, bins=np.arange(0, G + 2) - 0.5, color="C0")
            ax.set_title(f"block {block}")
            ax.set_xlabel("sampled tokens K'")
        np.atleast_1d(axes)[0].set_ylabel("images")
        fig.suptitle(f"{key}: ATS (rho={HIST_RHO}) tokens sampled per stage, {G} patch tokens")
        fig.tight_layout()
        p = out_dir / f"offshelf_kprime_{key}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared data/models folder")
    ap.add_argument("--limit", type=int, default=2000, help="test images per model (a fixed random subset)")
    ap.add_argument("--flops-images", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shared = Path(args.shared).resolve()
    if not (shared / "models").is_dir():
        print(f"offshelf: {shared} has no models/ folder (needs ../shared)", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    t0 = time.time()
    out = {
        "command": shlex.join([sys.executable.split("/")[-1], "benchmarks/offshelf.py"] + list(sys.argv[1:] if argv is None else argv)),
        "notes": "No fine-tuning. top1/top5 in percent on a fixed random subset (seed 0) of n_images of each test set; gflops_per_img = "
                 "multiply-adds/1e9 counted one image at a time on the first flops_images images. ats = multi-stage "
                 "(default stages: blocks 2-5 of 6), K = max(round(rho*(N+1)), min_k) at every stage, N+1 the unreduced tokens, with the paper's floor 8 scaled to the token count (min_k = round(8*(N+1)/197): 1 for MNIST, 3 for CIFAR); ats_single = block 2 "
                 "with a fixed K; topk = the same scores and budget, top-K; random/attention = drop at the input "
                 "(attention: CLS attention of block 1), knob = keep ratio. equal_gflops: the other curves "
                 "linearly interpolated at each ATS point (None outside their GFLOPs range).",
        "models": {},
    }
    for key in MODELS:
        out["models"][key] = run_model(key, shared, args.limit, args.flops_images, args.batch_size)
    out["seconds"] = time.time() - t0
    write_json(out_dir / "offshelf.json", out)
    for p in plot(out, out_dir):
        print("wrote", p)
    print(f"wrote {out_dir / 'offshelf.json'} in {out['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
