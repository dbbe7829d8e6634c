"""Table 3 of the IA-RED² paper on moving-fashion: video, D = 1, against the baselines.

The whole pipeline, in one command:

1. train a small JointST video ViT from scratch (`iared.training.backbone.train_backbone`);
2. IA-RED² with D = 1 (one interpreter in front of the first block) by the shared
   curriculum (`iared.training.curriculum.train_iared`): interpreter first, then a
   fine-tune of the blocks, in the paper's video ratio 5 : 1 (epochs);
3. evaluate original, random, attention, temporal difference, ATS and IA-RED² on 3-view
   test clips: clips/s, clip-1 and video-1 error, GFLOPs per clip, keep ratio. The
   baselines drop tokens at the keep ratio IA-RED² reached on the same clips (matched
   budget) and, as in the paper's Table 3, run on the *original* backbone without
   re-training (only IA-RED² had its fine-tune step);
4. per-frame heatmaps of the interpreter (and of temporal difference) for a few clips.

Writes `<out>/results.json`, `<out>/heatmaps.png`, and with `--json` a copy of the
results (with the exact command) to e.g. `benchmarks/results/moving_fashion.json`, and
the figure beside it (`moving_fashion_heatmaps.png`).

    python benchmarks/moving_fashion.py --quick --json benchmarks/results/moving_fashion.json
    python benchmarks/moving_fashion.py --budget-minutes 90 --json benchmarks/results/moving_fashion.json

`--budget-minutes` scales the number of training steps from a measured throughput of
one training step, so the run fits the budget on the machine it runs on; `--quick`
uses a smaller model and a fixed small number of steps (a smoke run, about 10-15 minutes
on 2 busy CPU cores). Budgets are split 60 % backbone, 25 % IA-RED², 15 % evaluation.
`--preset-from JSON` trains with the sizes and step counts recorded in a results JSON:
the command that reproduces a `--budget-minutes` run on another machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

import iared
from iared.backbones.jointst import frame_maps
from iared.data import build_dataset
from iared.data.video import MOTION_NAMES
from iared.commands.eval import EvalConfig, MethodSpec, run_video_eval
from iared.evaluation.throughput import steady_allocator
from iared.reduction.budgets import calibrate_iared
from iared.reduction.video_baselines import temporal_difference_scores
from iared.training.backbone import BackboneOptions, train_backbone
from iared.training.curriculum import TrainOptions, train_iared

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion_mnist"


@dataclass(frozen=True)
class Preset:
    """Model size and step counts of one run."""

    patch_size: int       # 12: 16 tokens per frame (128 per clip); 8: 36 per frame (288)
    embed_dim: int        # JointST width
    depth: int            # blocks
    num_heads: int        # heads
    backbone_epochs: int  # "epochs" of `backbone_steps` steps each (fresh clips every epoch)
    backbone_steps: int
    policy_steps: int     # interpreter: 5 epochs of this many steps, then 1 fine-tune epoch
    batch_size: int
    val_size: int         # validation clips after each epoch
    test_size: int        # 3-view test videos
    speed_batch: int      # clips per timed forward
    clutter_ramp: tuple[int, ...] = (0, 0, 2, 4, 6)  # clutter fragments in the first backbone epochs (then 8)


QUICK = Preset(patch_size=12, embed_dim=64, depth=4, num_heads=4, backbone_epochs=4, backbone_steps=15,
               policy_steps=5, batch_size=32, val_size=64, test_size=64, speed_batch=16)
FULL = Preset(patch_size=8, embed_dim=96, depth=4, num_heads=4, backbone_epochs=10, backbone_steps=100,
              policy_steps=40, batch_size=32, val_size=500, test_size=1000, speed_batch=32)


def scale_preset(base: Preset, budget_minutes: float, data: str) -> Preset:
    """Fit the step counts to the budget, from the measured time of a few training steps."""
    model = iared.create_model("jointst_custom", img_size=48, patch_size=base.patch_size, in_chans=1, num_frames=8,
                               embed_dim=base.embed_dim, depth=base.depth, num_heads=base.num_heads, num_classes=len(MOTION_NAMES))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    # Real batches: generating the moving-fashion clips is part of a step's cost.
    train = build_dataset(data, "train", seed=0)
    loader = iter(torch.utils.data.DataLoader(train, batch_size=base.batch_size, shuffle=True))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        batch = next(loader)
        loss = torch.nn.functional.cross_entropy(model(batch["video"]), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[1] * 1.15  # + validation and checkpoint overhead
    backbone_steps = int(0.60 * budget_minutes * 60 / step_s)
    # A REINFORCE step costs about one training step (two forwards, a small backward).
    policy_steps = int(0.25 * budget_minutes * 60 / step_s / 6)
    epochs = max(1, min(base.backbone_epochs, backbone_steps // 20))
    return Preset(**{**base.__dict__, "backbone_epochs": epochs, "backbone_steps": max(1, backbone_steps // epochs),
                     "policy_steps": max(1, policy_steps)})


def recorded_preset(results: dict[str, Any]) -> Preset:
    """The `Preset` a results JSON of this script was trained with."""
    return Preset(**{**results["preset"], "clutter_ramp": tuple(results["preset"]["clutter_ramp"])})


def heatmap_figure(model, test, n: int, path: Path) -> None:
    """Per-frame IA-RED² scores and kept tokens, and temporal-difference scores, for `n` clips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = torch.stack([test[i]["video"][1] for i in range(n)])             # centre views (n, 1, T, H, W)
    labels = [test.info.class_names[test[i]["label"]] for i in range(n)]
    with torch.no_grad():
        _, info = model.eval()(clips, return_info=True)
    T, hw = model.num_frames, model.frame_grid
    scores = frame_maps(info.stages[0].scores, T, hw)                        # (n, T, h, w)
    keep = frame_maps(info.stages[0].keep.float(), T, hw)
    with torch.no_grad():
        # Temporal-difference scores depend on the patch embedding only (frozen in training).
        td_scores = temporal_difference_scores(model.raw_patch_tokens(model.embed(clips)), T)
    td_maps = frame_maps(td_scores, T, hw)
    td_maps = td_maps / td_maps.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-9)
    H = clips.shape[-1]
    up = lambda m: torch.nn.functional.interpolate(m, size=(H, H), mode="nearest")  # noqa: E731
    rows = 4
    fig, axes = plt.subplots(rows * n, T, figsize=(T * 1.2, rows * n * 1.25))
    for i in range(n):
        frames = clips[i, 0]
        for t in range(T):
            panels = [
                (frames[t], "gray", f"{labels[i]}" if t == 0 else None),
                (up(scores[i:i + 1, t:t + 1])[0, 0], "inferno", "IA-RED² I" if t == 0 else None),
                (frames[t] * (0.25 + 0.75 * up(keep[i:i + 1, t:t + 1])[0, 0]), "gray", "kept" if t == 0 else None),
                (up(td_maps[i:i + 1, t:t + 1])[0, 0], "inferno", "temp. diff." if t == 0 else None),
            ]
            for r, (img, cmap, title) in enumerate(panels):
                ax = axes[rows * i + r, t]
                ax.imshow(img.numpy(), cmap=cmap, vmin=0 if cmap == "inferno" else None,
                          vmax=1 if cmap == "inferno" else None)
                ax.set_xticks([])
                ax.set_yticks([])
                if title:
                    ax.set_ylabel(title, fontsize=6)
                if rows * i + r == 0:
                    ax.set_title(f"t={t}", fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_all(backbone_path: Path, iared_path: Path, test, preset: Preset, keep_ratio: Optional[float],
                 allocator: str, val=None, ours_keep: Optional[float] = None) -> dict[str, Any]:
    """Table 3's rows (`iared.commands.eval.run_video_eval`); the baselines at IA-RED²'s
    keep ratio on the test clips unless `keep_ratio` is given.

    With `ours_keep`, a second IA-RED² row "ours@<ours_keep>" runs the same trained model
    with its interpreter threshold raised so that it keeps `ours_keep` of the tokens on
    the *validation* clips `val` (the `ours_keep` quantile of their scores; the test clips
    are not looked at), and the baselines are matched to that row's keep ratio instead.
    All methods are timed round-robin on the same clips.
    """
    ours, base = iared.load_model(iared_path), iared.load_model(backbone_path)
    cfg = EvalConfig(data="moving-fashion", checkpoint=str(iared_path), batch_size=preset.speed_batch,
                     flops_images=8, throughput_repeats=9, allocator="system")
    specs = [MethodSpec("ours", "iared")]
    if ours_keep is not None:
        val_clips = torch.stack([val[i]["video"][1] for i in range(min(256, len(val)))])
        threshold = calibrate_iared(iared.load_model(iared_path), val_clips, ours_keep)[0]
        print(f"ours@{ours_keep:g}: threshold {threshold:.4f} from {len(val_clips)} val clips", file=sys.stderr)
        specs.append(MethodSpec(f"ours@{ours_keep:g}", "iared", {"threshold": threshold}))
    if keep_ratio is None:  # IA-RED²'s keep ratio on the test clips, the baselines' budget
        measured = run_video_eval(dataclasses.replace(cfg, throughput=False), ours, base, specs[-1:], dataset=test)
        keep_ratio = max(measured["methods"][specs[-1].label]["keep_ratio"], 1.0 / ours.grid_size)
    # ATS in the first block with as many patch tokens as budget (K counts patch tokens; CLS is kept on top).
    n_keep = max(1, round(keep_ratio * ours.grid_size))
    baselines = [MethodSpec(name, name, {"keep_ratio": keep_ratio}) for name in ("random", "attention", "tempdiff")]
    specs = [MethodSpec("original", "original"), *baselines, MethodSpec("ats", "ats", {"stages": [0], "K": n_keep}),
             *specs]
    rows = run_video_eval(cfg, ours, base, specs, allocator, dataset=test)["methods"]
    for spec in specs:
        if spec.settings:
            rows[spec.label]["settings"] = dict(spec.settings)
    if ours_keep is not None:
        rows[specs[-1].label]["settings"]["val_keep_target"] = ours_keep
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="Fashion-MNIST idx files")
    p.add_argument("--out", default="runs/moving_fashion", help="run folder")
    p.add_argument("--json", default=None, help="also write the results here")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small fixed-size smoke run (~10-15 min on 2 busy cores)")
    g.add_argument("--budget-minutes", type=float, default=None, help="fit training to this wall-clock budget")
    g.add_argument("--preset-from", default=None, metavar="JSON",
                   help="train with the exact preset (sizes, step counts) of an earlier results JSON: "
                        "the way to reproduce a --budget-minutes run, whose step counts depend on the machine")
    p.add_argument("--keep-ratio", type=float, default=None, help="baselines' keep ratio (default: IA-RED²'s)")
    p.add_argument("--ours-keep-ratio", type=float, default=None,
                   help="also report IA-RED² with its threshold set on validation clips to keep this share "
                        "(baselines then match that row)")
    p.add_argument("--tau", type=float, default=1.0, help="IA-RED² reward penalty of a wrong prediction")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="IA-RED² stages: adam (lr 1e-3, blocks 1e-4) or the paper's video sgd (momentum 0.9, "
                        "lr 1e-2, blocks 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="resume the training runs in --out")
    p.add_argument("--eval-only", action="store_true",
                   help="skip training: evaluate the finished run in --out again (its results.json gives the preset)")
    args = p.parse_args(argv)
    for name in ("keep_ratio", "ours_keep_ratio"):
        v = getattr(args, name)
        if v is not None and not 0 < v <= 1:
            p.error(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
    torch.manual_seed(args.seed)
    t0 = time.time()
    data = f"moving-fashion:{args.data_dir}"
    out = Path(args.out)
    if args.eval_only or args.preset_from is not None:  # a recorded run: its results JSON gives the preset
        flag, source = ("--eval-only", out / "results.json") if args.eval_only else ("--preset-from", args.preset_from)
        try:
            trained = json.loads(Path(source).read_text())
            preset = recorded_preset(trained)
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"{flag} needs the results JSON of a finished run, {source}: {e}")
        if args.eval_only:
            return evaluate_and_report(args, data, out, preset, trained=trained)
    elif args.budget_minutes is not None:
        preset = scale_preset(FULL, args.budget_minutes, data)
    else:
        preset = QUICK if args.quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    print(f"preset: {preset}", file=sys.stderr, flush=True)

    t_bb = time.time()
    bb = train_backbone(BackboneOptions(
        data=data, arch="jointst_custom", out=str(out / "backbone"), embed_dim=preset.embed_dim, depth=preset.depth,
        num_heads=preset.num_heads, patch_size=preset.patch_size, epochs=preset.backbone_epochs,
        batch_size=preset.batch_size, lr=1e-3, weight_decay=0.05, warmup_epochs=0.5, label_smoothing=0.1,
        limit_batches=preset.backbone_steps, val_size=preset.val_size, seed=args.seed, resume=args.resume,
        checkpoint_every=50, clutter_ramp=preset.clutter_ramp))
    t_bb = time.time() - t_bb

    # The paper's video schedule: interpreter 5 epochs, then 1 epoch of fine-tuning.
    t_ia = time.time()
    ia = train_iared(TrainOptions(
        data=data, checkpoint=str(out / "backbone" / "model.safetensors"), out=str(out / "iared"), groups=1,
        epochs=6.0, schedule=(5.0, 1.0), finetune=True, tau=args.tau, optimizer=args.optimizer,
        lr=1e-3 if args.optimizer == "adam" else 1e-2, finetune_lr=1e-4 if args.optimizer == "adam" else 1e-3,
        batch_size=preset.batch_size, limit_batches=preset.policy_steps, val_size=preset.val_size, seed=args.seed,
        resume=args.resume, checkpoint_every=50))
    t_ia = time.time() - t_ia
    trained = {"command": None, "wall_s": {"backbone": t_bb, "iared": t_ia},
               "backbone": {"val_top1": (bb.get("val") or {}).get("top1")},
               "iared": {"val": {k: ia["val"][k] for k in ("top1", "keep_ratio")} if ia.get("val") else None,
                         "backbone_val_top1": (ia.get("backbone_val") or {}).get("top1")}}
    return evaluate_and_report(args, data, out, preset, trained, t0=t0)


def evaluate_and_report(args, data: str, out: Path, preset: Preset, trained: dict[str, Any],
                        t0: Optional[float] = None) -> int:
    """Evaluate the run in `out`, write the results and the figure, print Table 3.

    `trained` holds what the training part reported (validation numbers, wall times);
    with --eval-only it is the run's earlier results.json, whose command is kept as
    `trained_by`.
    """
    t0 = time.time() if t0 is None else t0
    allocator = steady_allocator()  # before the timed forwards, as `iared bench speed` and `iared eval`
    test = build_dataset(data, "test", seed=args.seed, views=3, limit=preset.test_size)
    t_ev = time.time()
    val = build_dataset(data, "val", seed=args.seed, views=3, limit=preset.val_size) if args.ours_keep_ratio else None
    methods = evaluate_all(out / "backbone" / "model.safetensors", out / "iared" / "model.safetensors", test,
                           preset, args.keep_ratio, allocator, val=val, ours_keep=args.ours_keep_ratio)
    t_ev = time.time() - t_ev
    ours = iared.load_model(out / "iared" / "model.safetensors")
    heatmap_figure(ours, test, 3, out / "heatmaps.png")

    results = {
        "data": "moving-fashion", "task": "Table 3 (video, D = 1)",
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "trained_by": trained.get("trained_by") or trained.get("command"),
        "preliminary": bool(args.quick),
        "device": "cpu", "threads": torch.get_num_threads(), "allocator": allocator,
        "backbone": {"arch": "jointst_custom", "num_frames": 8, "img_size": 48, "patch_size": preset.patch_size,
                     "tokens_per_clip": 8 * (48 // preset.patch_size) ** 2, "embed_dim": preset.embed_dim,
                     "depth": preset.depth, "val_top1": trained["backbone"]["val_top1"]},
        "iared": {"groups": 1, "schedule_epochs": [5, 1], "tau": args.tau, "optimizer": args.optimizer,
                  "operating_keep_on_val": args.ours_keep_ratio,
                  "val": trained["iared"]["val"], "backbone_val_top1": trained["iared"]["backbone_val_top1"]},
        "preset": preset.__dict__,
        "test_videos": len(test) if preset.test_size is None else min(preset.test_size, len(test)),
        "baselines_retrained": False,
        "methods": methods,
        "wall_s": {"backbone": trained["wall_s"]["backbone"], "iared": trained["wall_s"]["iared"], "eval": t_ev,
                   "total": time.time() - t0 if trained.get("command") is None else
                   trained["wall_s"]["backbone"] + trained["wall_s"]["iared"] + t_ev},
    }
    if args.quick:
        results["note"] = (
            f"Preliminary --quick smoke run ({preset.backbone_epochs * preset.backbone_steps} backbone steps of "
            f"{preset.batch_size} clips, {len(test)} test videos, speeds on a shared CPU). Backbone val top-1 "
            f"{results['backbone']['val_top1']:.1f}% (chance {100 / test.info.num_classes:.1f}%): errors say little "
            "at this size; token counts, keep ratios and GFLOPs are exact. Use --budget-minutes 90 for the real run.")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if args.json:
        dest = Path(args.json)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(results, indent=2))
        shutil.copyfile(out / "heatmaps.png", dest.with_name(dest.stem + "_heatmaps.png"))
    print(f"{'method':10s} {'clips/s':>8s} {'clip-1':>7s} {'video-1':>7s} {'GFLOPs':>7s} {'keep':>5s}")
    for name, r in methods.items():
        print(f"{name:10s} {r['clips_per_s']:8.1f} {r['clip1_err']:7.1f} {r['video1_err']:7.1f} "
              f"{r['gflops_per_clip']:7.4f} {r['keep_ratio']:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
