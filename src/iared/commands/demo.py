"""`iared demo`: the whole story on the embedded cluttered-digits data, end to end.

1. *backbone*: train a small plain ViT from scratch (`training.backbone.train_backbone`);
2. *iared*: train IA-RED² with D = 3 groups by the curriculum of Algorithm 1
   (`training.curriculum.train_iared`);
3. *sweep*: evaluate every method over a range of its budget (`commands.sweep.budget_sweep`)
   to draw accuracy against GFLOPs;
4. *matched*: evaluate `original, iared, ats, topk, random, attention` with each baseline's
   budget set to match IA-RED²'s GFLOPs (interpolated on the sweep), with throughput and
   the heatmap segmentation metrics (cluttered-digits has pixel masks): `results.json`;
5. *figures*: heatmap panels like the paper's Fig. 4 (image, one heatmap per group with
   its kept ratio in the corner, the kept patches), a method comparison like Fig. 3, and
   the trade-off plot; then `report.md`.

Every stage writes into its own place under `--out` through temporary files and renames,
and a stage whose finished output is already there (with the same settings) is reused,
so an interrupted demo picks up where it stopped; training stages resume from their own
checkpoints.

Schedules (`FULL`, `QUICK`) were chosen by measurement; see the comment on `FULL`.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..fileio import write_json
from .sweep import budget_sweep, matched_eval


DATA = "cluttered-digits"
# Methods compared in the heatmap-method figure (Fig. 3): the baselines explain the backbone.
HEATMAP_METHODS = ("attention", "rollout", "gradcam", "iared")


@dataclass(frozen=True)
class DemoSchedule:
    """Model size and training/evaluation budgets of one demo flavour."""

    embed_dim: int                          # token width
    depth: int                              # blocks (divisible by `groups`)
    num_heads: int                          # attention heads
    patch_size: int                         # 48 / patch_size patches per side
    patch_overlap: int                      # pixels each patch kernel sees beyond its patch
    backbone_epochs: float                  # plain ViT training length
    backbone_lr: float                      # its AdamW peak learning rate
    clutter_ramp: tuple[int, ...]           # clutter fragments in the first backbone epochs
    groups: int                             # D, the IA-RED² groups
    iared_epochs: float                     # curriculum budget per group (split by `schedule`)
    schedule: tuple[float, float]           # E_p : E_b per group
    iared_lr: float                         # interpreter learning rate (Adam)
    finetune_lr: float                      # block fine-tuning learning rate (Adam)
    tau: float                              # Eq. 2 penalty of a wrong prediction
    batch_size: int                         # training batch size
    limit_batches: Optional[int]            # cap on steps per epoch (tiny runs)
    val_size: Optional[int]                 # validation images (None: all)
    val_every: int                          # validate every N training epochs (and at each stage's end)
    eval_images: Optional[int]              # test images evaluated (None: the whole test split)
    flops_images: int                       # images whose FLOPs are counted (one at a time)
    speed_batch: int                        # batch size of the throughput measurement
    sweep: dict[str, tuple[float, ...]]     # method -> budget values of the trade-off sweep
    figure_images: int                      # examples in the heatmap figures

    @property
    def num_patches(self) -> int:
        """Patch tokens of the demo's model on the 48x48 canvas."""
        return (48 // self.patch_size) ** 2


# About 6.5 minutes on 2 cores; the backbone recipe (overlapping patches, 90 epochs) and the
# budget are measured in docs/performance.md. tau = 4 chosen on the validation split among 1, 2
# and 4. Patch 6 gives an 8x8 grid (64 tokens): fine enough for heatmaps, cheap enough to train.
FULL = DemoSchedule(
    embed_dim=64, depth=6, num_heads=4, patch_size=6, patch_overlap=2, backbone_epochs=90.0, backbone_lr=1e-3,
    clutter_ramp=(0,) * 10 + (2,) * 10 + (4,) * 10, groups=3, iared_epochs=20.0, schedule=(1.0, 1.0),
    iared_lr=1e-3, finetune_lr=1e-4, tau=4.0, batch_size=64, limit_batches=None, val_size=None, val_every=10,
    eval_images=None, flops_images=16, speed_batch=64,
    sweep={"iared": (0.3, 0.4, 0.6, 0.7, 0.8), "ats": (0.2, 0.4, 0.6, 0.8), "topk": (0.2, 0.4, 0.6, 0.8),
           "random": (0.1, 0.2, 0.4, 0.6, 0.8), "attention": (0.1, 0.2, 0.4, 0.6, 0.8)},
    figure_images=4,
)

QUICK = DemoSchedule(
    embed_dim=32, depth=3, num_heads=2, patch_size=6, patch_overlap=2, backbone_epochs=1.0, backbone_lr=1e-3,
    clutter_ramp=(), groups=3, iared_epochs=1.0, schedule=(1.0, 0.0), iared_lr=1e-3, finetune_lr=1e-4,
    tau=1.0, batch_size=32, limit_batches=3, val_size=32, val_every=1, eval_images=32, flops_images=2,
    speed_batch=16,
    sweep={"iared": (0.3, 0.7), "ats": (0.3, 0.7), "topk": (0.3, 0.7), "random": (0.3, 0.7),
           "attention": (0.3, 0.7)},
    figure_images=2,
)


@dataclass(frozen=True)
class DemoOptions:
    """What `iared demo` was asked for."""

    out: str = "runs/demo"                  # output folder
    quick: bool = False                     # the tiny schedule (tests)
    seed: int = 0                           # every random choice
    device: str = "cpu"                     # "cpu" or "cuda"
    progress: bool = True                   # progress bars
    command: str = ""                       # the command line, recorded in results.json


# -- pure helpers ---------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _stage_ready(folder: Path, settings: dict[str, Any]) -> bool:
    """A stage's finished output is in `folder` and was made with the same `settings`."""
    marker = folder / "stage.json"
    if not all(p.is_file() for p in (marker, folder / "model.safetensors", folder / "metrics.json")):
        return False
    try:
        state = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(state.get("finished")) and state.get("settings") == _jsonable(settings)


def _prepare_stage(folder: Path, settings: dict[str, Any]) -> None:
    """Start (or resume) a stage in `folder`: leftovers of a run with other settings are removed.

    A training run resumes from its checkpoints only with identical settings, so a
    folder last used with another schedule (e.g. `--quick`, then the full demo) is
    cleared; it holds only what an earlier demo wrote there (recognised by stage.json).
    """
    import shutil

    marker = folder / "stage.json"
    if marker.is_file():
        try:
            same = json.loads(marker.read_text()).get("settings") == _jsonable(settings)
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"settings": _jsonable(settings), "finished": False})


def _finish_stage(folder: Path, settings: dict[str, Any]) -> None:
    write_json(folder / "stage.json", {"settings": _jsonable(settings), "finished": True})


def _train_backbone(folder: Path, sched: DemoSchedule, options: DemoOptions, log: Callable[[str], None]
                    ) -> tuple[Path, dict[str, Any], bool]:
    """Stage 1. Returns (model file, summary, whether it was reused)."""
    from ..training.backbone import BackboneOptions, train_backbone

    bopts = BackboneOptions(
        data=DATA, arch="vit_custom", out=str(folder), embed_dim=sched.embed_dim, depth=sched.depth,
        num_heads=sched.num_heads, patch_size=sched.patch_size, patch_overlap=sched.patch_overlap,
        epochs=sched.backbone_epochs, batch_size=sched.batch_size, lr=sched.backbone_lr, clutter_ramp=sched.clutter_ramp,
        limit_batches=sched.limit_batches, val_size=sched.val_size, val_every=sched.val_every, checkpoint_every=50,
        seed=options.seed, device=options.device, resume=True, progress=options.progress)
    settings = {k: v for k, v in dataclasses.asdict(bopts).items() if k not in ("out", "progress", "resume")}
    path = folder / "model.safetensors"
    if _stage_ready(folder, settings):
        log(f"[demo] 1/5 backbone: reusing {path}")
        return path, json.loads((folder / "metrics.json").read_text()), True
    log(f"[demo] 1/5 backbone: training a {sched.depth}-block, width-{sched.embed_dim} ViT "
        f"(patch {sched.patch_size}) on {DATA}")
    _prepare_stage(folder, settings)
    summary = train_backbone(bopts)
    _finish_stage(folder, settings)
    return path, summary, False


def _train_iared(folder: Path, backbone: Path, sched: DemoSchedule, options: DemoOptions, reuse_ok: bool,
                 log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """Stage 2: Algorithm 1 on the backbone. Returns (model file, summary)."""
    from ..training.curriculum import TrainOptions, train_iared

    topts = TrainOptions(
        data=DATA, checkpoint=str(backbone), out=str(folder), groups=sched.groups, epochs=sched.iared_epochs,
        schedule=sched.schedule, finetune=sched.schedule[1] > 0, tau=sched.tau, lr=sched.iared_lr,
        finetune_lr=sched.finetune_lr, batch_size=sched.batch_size, limit_batches=sched.limit_batches,
        val_size=sched.val_size, val_every=sched.val_every, checkpoint_every=50, seed=options.seed,
        device=options.device, resume=True, progress=options.progress)
    settings = {k: v for k, v in dataclasses.asdict(topts).items()
                if k not in ("out", "progress", "resume", "checkpoint")}
    path = folder / "model.safetensors"
    if reuse_ok and _stage_ready(folder, settings):
        log(f"[demo] 2/5 IA-RED²: reusing {path}")
        return path, json.loads((folder / "metrics.json").read_text())
    if not reuse_ok and folder.exists():
        import shutil

        shutil.rmtree(folder)  # trained on a backbone that was just retrained: stale
    log(f"[demo] 2/5 IA-RED²: curriculum with D = {sched.groups} "
        f"({sched.iared_epochs:g} epochs per group, E_p:E_b = {sched.schedule[0]:g}:{sched.schedule[1]:g})")
    _prepare_stage(folder, settings)
    summary = train_iared(topts)
    _finish_stage(folder, settings)
    return path, summary


def _eval_config(model_path: Path, sched: DemoSchedule, options: DemoOptions, **kw: Any):
    from .eval import EvalConfig

    # batch_size is also the throughput batch of run_eval.
    return EvalConfig(data=DATA, checkpoint=str(model_path), split="test", batch_size=sched.speed_batch,
                      limit_images=sched.eval_images, flops_images=sched.flops_images, device=options.device,
                      seed=options.seed, progress=options.progress, **kw)


def _figures(out: Path, model_path: Path, backbone_path: Path, sched: DemoSchedule, options: DemoOptions,
             sweep: dict[str, list[dict[str, Any]]], matched: dict[str, Any]) -> list[tuple[str, str]]:
    """Stage 5: heatmap panels (Fig. 4), heatmap methods side by side (Fig. 3), trade-off plot.

    IA-RED²'s heatmaps come from its interpreters, the other explainers' from the backbone.

    Returns:
        (caption, file name relative to `out`) per PNG written.
    """
    from ..evaluation.figures import denormalize, heatmap_panel, method_grid, save_figure
    from ..evaluation.heatmaps import explain
    from ..evaluation.report import save_tradeoff_plot
    from ..models import load_model
    from ..training.setup import load_data

    model = load_model(model_path).to(options.device).eval()
    data_cfg = (model.model_meta or {}).get("data") or {}
    ds = load_data(DATA, "test", options.seed, mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]))
    info = ds.info
    items = [ds[i] for i in range(min(sched.figure_images, len(ds)))]
    images = torch.stack([it["image"] for it in items]).to(options.device)
    labels = [int(it["label"]) for it in items]
    grid_hw = tuple(model.patch_embed.grid_size)
    with torch.no_grad():
        logits, rinfo = model(images, return_info=True, mode="greedy")
    preds = logits.argmax(-1).tolist()
    shown = [denormalize(images[i].cpu(), info.mean, info.std) for i in range(len(items))]

    written: list[tuple[str, str]] = []
    for i in range(len(items)):
        scores = [s.scores[i].cpu() for s in rinfo.stages]
        keeps = [s.keep[i].cpu() for s in rinfo.stages]
        name = f"heatmaps_iared_{i}.png"
        fig = heatmap_panel(shown[i], scores, keeps, grid_hw,
                            title=f"label {info.class_names[labels[i]]}, IA-RED² predicts {info.class_names[preds[i]]}")
        save_figure(fig, out / name)
        written.append((f"IA-RED² heatmaps per group, test image {i} (corner: ratio of patches kept)", name))

    backbone = load_model(backbone_path).to(options.device).eval()
    heat = {m: explain(backbone, images, m).detach().cpu() for m in HEATMAP_METHODS if m != "iared"}
    heat["iared"] = explain(model, images, "iared", group=None)
    # The paper's Fig. 3 shows the second group's scores (index 1).
    heat["iared"] = heat["iared"][min(1, len(heat["iared"]) - 1)].detach().cpu()
    fig = method_grid(shown, {m: list(heat[m]) for m in HEATMAP_METHODS}, grid_hw,
                      row_labels=[info.class_names[y] for y in labels],
                      title="heatmaps: raw attention (block 1), rollout, GradCAM, IA-RED² (group 2)")
    save_figure(fig, out / "heatmaps_methods.png")
    written.append(("Heatmap methods side by side (IA-RED² group 2 on a fixed 0–1 scale, others min-max)",
                    "heatmaps_methods.png"))

    save_tradeoff_plot(sweep, out / "tradeoff.png", matched=matched["methods"],
                       title=f"{DATA}: accuracy vs cost (hollow: budgets matched to IA-RED²)")
    written.append(("Accuracy vs GFLOPs: budget sweep of every method", "tradeoff.png"))
    return written


# -- the job --------------------------------------------------------------------------------


def run_demo(options: DemoOptions, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
             ) -> dict[str, Any]:
    """Run the whole demo into `options.out`; return the results dict written to results.json.

    Raises:
        UserError: the output folder cannot be written (before any work).
    """
    from ..evaluation.report import write_report
    from ..training.setup import check_output_dir

    sched = QUICK if options.quick else FULL
    out = Path(options.out)
    check_output_dir(out)
    torch.manual_seed(options.seed)
    t0 = time.time()
    wall: dict[str, float] = {}

    t = time.time()
    backbone, bb_summary, reused = _train_backbone(out / "backbone", sched, options, log)
    wall["backbone"] = time.time() - t
    t = time.time()
    model_path, ia_summary = _train_iared(out / "iared", backbone, sched, options, reused, log)
    wall["iared"] = time.time() - t

    log("[demo] 3/5 budget sweep of every method")
    t = time.time()
    # The baselines and the 'original' row run on the backbone itself: the IA-RED² blocks were fine-tuned.
    base = _eval_config(model_path, sched, options, command=options.command, backbone=str(backbone))
    sweep, iared_point = budget_sweep(base, sched.sweep)
    wall["sweep"] = time.time() - t

    log(f"[demo] 4/5 methods at IA-RED²'s cost ({iared_point['gflops_per_img']:.4f} GFLOPs), "
        "speed and heatmap segmentation")
    t = time.time()
    results = matched_eval(base, sweep, iared_point["gflops_per_img"])
    wall["matched"] = time.time() - t

    log("[demo] 5/5 figures and report")
    t = time.time()
    figures = _figures(out, model_path, backbone, sched, options, sweep, results)
    wall["figures"] = time.time() - t

    results["sweep"] = sweep
    results["training"] = {
        "backbone": {"arch": "vit_custom", "size": {"embed_dim": sched.embed_dim, "depth": sched.depth,
                                                     "num_heads": sched.num_heads, "patch_size": sched.patch_size,
                                                     "patch_overlap": sched.patch_overlap},
                     "val": bb_summary.get("val"), "wall_s": bb_summary.get("session_wall_s")},
        "iared": {"groups": ia_summary.get("groups"), "val": ia_summary.get("val"),
                  "backbone_val": ia_summary.get("backbone_val"), "per_stage": ia_summary.get("per_stage"),
                  "wall_s": ia_summary.get("session_wall_s")},
    }
    results["schedule"] = "quick" if options.quick else "full"
    results["wall_s"] = time.time() - t0
    results["stage_wall_s"] = wall
    results["figures"] = [name for _, name in figures]
    results["speed_batch"] = sched.speed_batch
    results["conclusion"] = conclusion(results, sched.num_patches)
    write_json(out / "results.json", results)

    write_report(out / "report.md", results, title=f"iared demo: IA-RED² on {DATA}",
                 lead=" ".join(results["conclusion"]), intro=_intro(sched, options), sweep=sweep, figures=figures,
                 training=results["training"], notes=_notes(results))
    log("\n" + "\n".join(results["conclusion"]) + "\n")
    log(f"[demo] done in {results['wall_s'] / 60:.1f} min: {out / 'results.json'}, {out / 'report.md'}")
    return results


def _intro(sched: DemoSchedule, options: DemoOptions) -> str:
    k = sched.patch_size + 2 * sched.patch_overlap
    return (f"Setup: a {sched.depth}-block ViT (width {sched.embed_dim}, {sched.num_heads} heads, "
            f"{sched.num_patches} patch tokens of {sched.patch_size}×{sched.patch_size}, each embedded from the "
            f"{k}×{k} pixels around it) trained from scratch on cluttered-digits (scikit-learn's "
            f"handwritten digits at random positions on a 48×48 canvas with clutter cut from other digits), then "
            f"IA-RED² with D = {sched.groups} groups trained by Algorithm 1. Test split"
            + (f", first {sched.eval_images} images" if sched.eval_images else "") + "."
            + (" **Quick schedule: tiny model, a few steps: the numbers show the pipeline, not the method.**"
               if options.quick else ""))


BASELINE_NAMES = {"ats": "ATS", "topk": "top-K", "random": "random", "attention": "attention"}


def conclusion(results: dict[str, Any], num_patches: int) -> list[str]:
    """The report's opening sentences, generated from a demo's results.

    What was trained and how well it reads the digits, IA-RED²'s accuracy and measured
    speed against the backbone, how far each baseline falls at the same cost, and what
    ATS's samples do on this model (distinct tokens per stage from its keep ratios).

    Args:
        results: the demo's results ("methods" at matched cost, "training").
        num_patches: patch tokens of the unreduced model.

    Returns:
        Sentences, in order (the ATS one only when ATS was evaluated).
    """
    m, bb = results["methods"], results["training"]["backbone"]
    o, i = m["original"], m["iared"]
    size = bb["size"]
    out = [f"A {size['depth']}-block ViT (width {size['embed_dim']}, {num_patches} patch tokens) trained from "
           f"scratch in {bb['wall_s'] / 60:.1f} min reads the cluttered digits at {_acc(o)} test top-1 "
           f"({o['n_images']} canvases), and IA-RED² with D = {results['training']['iared']['groups']} groups, "
           f"trained from it by Algorithm 1 in {results['training']['iared']['wall_s'] / 60:.1f} min, at "
           f"{_acc(i)} ({i['top1'] - o['top1']:+.1f} points).",
           f"IA-RED² keeps {100 * i['keep_ratio']:.0f} % of the patch tokens after its last group, for "
           f"{o['gflops_per_img'] / i['gflops_per_img']:.2f}× fewer GFLOPs and {i['speedup']:.2f}× the backbone's "
           f"measured throughput (batch {results.get('speed_batch', '?')}, {results.get('threads', '?')} CPU threads)."]
    names = [n for n in BASELINE_NAMES if n in m]
    if names:
        gap = {n: f"{i['top1'] - m[n]['top1']:.1f}" for n in names}
        dearer = [n for n in names if m[n]["gflops_per_img"] > 1.05 * i["gflops_per_img"]]
        matched = [n for n in names if n not in dearer]
        parts = []
        if matched:
            parts.append(f"At IA-RED²'s GFLOPs the baselines fall behind it by "
                         f"{_join([f'{BASELINE_NAMES[n]} {gap[n]}' for n in matched])} points")
        if dearer:
            ratios = _join([f"{m[n]['gflops_per_img'] / i['gflops_per_img']:.2f}×" for n in dearer])
            parts.append(f"{_join([BASELINE_NAMES[n] for n in dearer])} cannot get that cheap within the swept "
                         f"budgets and, at {ratios} its GFLOPs, still fall {_join([gap[n] for n in dearer])} points "
                         "behind")
        se_diff = (i["top1_se"] ** 2 + max(m[n]["top1_se"] for n in names) ** 2) ** 0.5
        text = "; ".join(parts)
        out.append(f"{text[0].upper()}{text[1:]} (the standard error of such a difference is about {se_diff:.1f}).")
    if "ats" in m and m["ats"].get("keep_ratio_per_stage"):
        a = m["ats"]
        k = _ats_samples(a, num_patches)
        hits = [r * num_patches for r in a["keep_ratio_per_stage"]]
        where = (f"{', '.join(f'{h:.1f}' for h in hits)} distinct patch tokens in blocks "
                 f"{', '.join(str(b) for b in a.get('stage_blocks', []))}")
        if min(hits) < 0.5 * k:  # most samples repeat: the scores sit on a few tokens
            out.append(f"ATS draws K = {k} samples per stage but they land on only {where}: this backbone's "
                       f"class-token attention sits on a few tokens, so inverse-transform sampling draws the same "
                       f"ones again and again, and raising ρ adds few new tokens (its sweep below).")
        else:
            out.append(f"ATS draws K = {k} samples per stage and they land on {where}: its samples seldom repeat "
                       f"on this backbone, so what it keeps follows ρ.")
    return out


def _join(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _acc(row: dict[str, Any]) -> str:
    return f"{row['top1']:.1f} ± {row['top1_se']:.1f} %"


def _ats_samples(row: dict[str, Any], num_patches: int) -> Any:
    from ..reduction.ats import budget_k

    pol = row.get("policy") or {}
    if pol.get("K") is not None:
        return pol["K"]
    return budget_k(num_patches + 1, pol.get("rho"), None, pol.get("min_k", 8))


def _notes(results: dict[str, Any]) -> list[str]:
    m = results["methods"]
    lines = [f"- Every baseline's budget knob was set so its GFLOPs match IA-RED²'s "
             f"({results['matched_to']['gflops_per_img']:.4f} GFLOPs/img), by linear interpolation on its sweep; "
             "the GFLOPs column shows how close each came.",
             "- `random` and `attention` drop tokens once at the input (the IA-RED² paper's baselines; `attention` "
             "runs block 0 and block 1's query/key on every token first, which its GFLOPs include); `ats`/`topk` "
             "sample/keep the top tokens inside blocks by the CLS attention (ATS paper).",
             "- GFLOPs are multiply-adds per image, counted one image at a time; img/s is one measured batch and "
             "is noisy on a shared CPU."]
    if "iared" in m and "original" in m:
        o, i = m["original"], m["iared"]
        lines.append(f"- IA-RED² keeps {100 * i['keep_ratio']:.0f} % of the patch tokens after the last group "
                     f"(per group: {', '.join(f'{100 * k:.0f} %' for k in i.get('keep_ratio_per_group', []))}), "
                     f"at {o['gflops_per_img'] / i['gflops_per_img']:.2f}× fewer GFLOPs, "
                     f"top-1 {i['top1'] - o['top1']:+.2f} points vs the backbone.")
    return ["## How to read this\n\n" + "\n".join(lines)]


def demo_command(options: DemoOptions) -> str:
    """The command line equivalent to `options` (recorded in results.json)."""
    parts = ["iared", "demo", "--out", options.out] + (["--quick"] if options.quick else [])
    parts += ["--seed", str(options.seed), "--device", options.device]
    return shlex.join(parts)
