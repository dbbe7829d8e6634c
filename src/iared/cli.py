"""The `iared` command line: parse arguments, build a config, call one function.

Every command shares `--device` and `--seed`. A user mistake (bad path, bad file, bad
flag value) is reported as one line on stderr with exit code 2, never a traceback; the
library raises `iared.errors.UserError` (or a subclass) for those.

`main(argv)` is callable from Python, so tests run a command as `main([...])`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .errors import ErrorOnOtherRank, UserError, prints_here, report, set_program


def _device(name: Optional[str]) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return name


def _check_output_file(path: str) -> None:
    """Fail before the work, not after it, when the --json `path` cannot be written (UserError)."""
    from .fileio import check_writable

    try:
        check_writable(path, is_file=True)
    except OSError as e:
        raise UserError(f"cannot write --json {path}: {e.strerror or e}") from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _number(lo: float = float("-inf"), hi: float = float("inf"), open_lo: bool = False, open_hi: bool = False):
    """An argparse type: a float in the interval lo..hi (ends open or closed)."""
    interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ((lo < v) if open_lo else (lo <= v)) or not ((v < hi) if open_hi else (v <= hi)):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text}")
        return v

    return parse


_POSITIVE = _number(0.0, open_lo=True, open_hi=True)
_NON_NEGATIVE = _number(0.0, open_hi=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=_POSITIVE, default=None, help="training budget in epochs")
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--lr", type=_POSITIVE, default=None)
    p.add_argument("--limit-batches", type=_positive_int, default=None,
                   help="stop each epoch after N batches (tiny runs and tests)")
    p.add_argument("--workers", type=_nonneg_int, default=0, help="data-loading worker processes")
    p.add_argument("--val-size", type=_positive_int, default=None, help="validate on the first N items")
    p.add_argument("--val-every", type=_positive_int, default=1,
                   help="validate every N epochs and at the end of each stage (default 1)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (as every other user error is)
    instead of the whole usage text; sub-command parsers inherit it."""

    def error(self, message: str):
        if not prints_here():
            # Under torchrun every rank meets the mistake and rank 0 says it; torchrun stops the
            # other ranks as soon as one exits, so give rank 0 a moment to print first.
            import time

            time.sleep(1.0)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n" if prints_here() else None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="iared", description=(
        "IA-RED² and ATS: faster, explainable vision transformers by dropping uninformative patch tokens."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="end-to-end on the embedded default data (cluttered-digits)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a 2-minute version (used by tests)")
    _common(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train-backbone", help="train a plain ViT from scratch")
    p.add_argument("--data", required=True, help="KIND[:PATH], e.g. cluttered-digits, cifar10:DIR")
    p.add_argument("--arch", required=True, help="registry name, e.g. vit_custom, deit_tiny_patch16_224")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    _common(p)
    _training(p)
    p.add_argument("--embed-dim", type=_positive_int, default=None, help="token width (vit_custom default 64)")
    p.add_argument("--depth", type=_positive_int, default=None, help="blocks (vit_custom default 6)")
    p.add_argument("--heads", type=_positive_int, default=None, help="attention heads (vit_custom default 4)")
    p.add_argument("--patch-size", type=_positive_int, default=None, help="patch side (vit_custom default 4)")
    p.add_argument("--patch-overlap", type=_nonneg_int, default=None,
                   help="pixels each patch's kernel sees beyond the patch on every side (vit_custom default 0)")
    p.add_argument("--weight-decay", type=_NON_NEGATIVE, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--warmup-epochs", type=_NON_NEGATIVE, default=0.3, help="linear warmup (default 0.3 epochs)")
    p.add_argument("--label-smoothing", type=_number(0.0, 1.0, open_hi=True), default=0.1, help="default 0.1")
    p.add_argument("--clutter-ramp", default="",
                   help="clutter fragments for the first epochs, e.g. 0,2,4 (cluttered data only)")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (mirror-symmetric classes)")
    p.add_argument("--init", default=None, help="start from this model file's weights (same architecture)")
    p.set_defaults(func=_cmd_train_backbone)

    p = sub.add_parser("train", help="IA-RED² training (Algorithm 1: interpreters by REINFORCE, then fine-tuning)")
    p.add_argument("--data", required=True, help="KIND[:PATH]")
    p.add_argument("--checkpoint", required=True, help="backbone model file")
    p.add_argument("--groups", type=_positive_int, default=3, help="D, the number of groups (default 3)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    _common(p)
    _training(p)
    p.add_argument("--arch", default=None, help="registry name: needed when --checkpoint is a plain state dict")
    p.add_argument("--tau", type=float, default=1.0, help="penalty of a wrong prediction, Eq. 2 (default 1.0)")
    p.add_argument("--target", choices=["label", "agreement"], default="label",
                   help="what 'correct' means in Eq. 2: the label (the paper), or agreement with the unreduced "
                        "backbone's prediction (no labels needed)")
    p.add_argument("--schedule", default="10:20", help="E_p:E_b, interpreter vs fine-tuning epochs (default 10:20)")
    p.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=True,
                   help="fine-tune the blocks after each interpreter (default on)")
    p.add_argument("--finetune-lr", type=_POSITIVE, default=None, help="learning rate of the blocks (default: --lr)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam (the paper's images, default) or sgd with momentum 0.9 (its video runs)")
    p.add_argument("--label-smoothing", type=_number(0.0, 1.0, open_hi=True), default=0.0,
                   help="when fine-tuning (default 0)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="accuracy, FLOPs, throughput and keep ratio per method")
    p.add_argument("--data", required=True, help="KIND[:PATH]")
    p.add_argument("--checkpoint", required=True, help="model file (backbone or IA-RED²)")
    p.add_argument("--backbone", default=None,
                   help="model file that 'original' and the baselines run on (default: the checkpoint's blocks; "
                        "pass the backbone an IA-RED² model was fine-tuned from)")
    p.add_argument("--methods", default="original,iared", help="comma-separated method names")
    p.add_argument("--policy", default=None,
                   help="IA-RED² policy file (trained interpreters) for the --checkpoint backbone")
    p.add_argument("--json", required=True, help="where to write the results JSON")
    p.add_argument("--segmentation", action="store_true", help="add heatmap segmentation metrics")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--limit-batches", type=_positive_int, default=None)
    p.add_argument("--limit-images", type=_positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--arch", default=None,
                   help="registry name for a foreign .pth/.pt checkpoint (e.g. vit_mnist_patch7_28)")
    p.add_argument("--threshold", type=_number(0.0, 1.0), default=None,
                   help="keep threshold of the checkpoint's IA-RED² interpreters (default: as saved)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--flops-images", type=_positive_int, default=32,
                   help="GFLOPs are averaged over the first N images (default 32)")
    p.add_argument("--no-throughput", action="store_true", help="skip the img/s measurement")
    p.add_argument("--allocator", choices=("steady", "system"), default="steady",
                   help="as for `iared bench speed`: glibc keeps freed memory for reuse (default), or as is")
    p.add_argument("--mean", default=None, help="input normalisation mean, comma-separated (default: model file's)")
    p.add_argument("--std", default=None, help="input normalisation std, comma-separated")
    p.add_argument("--workers", type=_nonneg_int, default=0, help="data-loading worker processes")
    _common(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("interpret", help="per-group heatmaps, overlays and kept patches for images")
    p.add_argument("-p", "--path", dest="paths", action="append", required=True, help="an image (repeatable)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--checkpoint", required=True,
                   help="IA-RED² model file, or any backbone with --method (timm .safetensors, .pth with --arch)")
    p.add_argument("--method", default=None,
                   help="interpret a training-free policy on the backbone instead, e.g. ats, topk@0.6, random@0.65")
    p.add_argument("--policy", default=None,
                   help="IA-RED² policy file (trained interpreters) for the --checkpoint backbone")
    p.add_argument("--arch", default=None, help="registry name: needed when --checkpoint is a plain state dict")
    p.add_argument("--cmap", default="jet", help="matplotlib colormap of the heatmaps (default jet)")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap weight in the overlay (default 0.5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p)
    p.set_defaults(func=_cmd_interpret)

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bsub.add_parser("speed", help="throughput of every method on one backbone")
    b.add_argument("--arch", required=True, help="registry name, e.g. deit_small_patch16_224")
    b.add_argument("--img-size", type=_positive_int, default=None)
    b.add_argument("--batch-size", type=_positive_int, default=64)
    b.add_argument("--json", required=True, help="where to write the results JSON")
    b.add_argument("--keep-ratio", type=float, default=0.6,
                   help="budget: every method keeps about this share of patch tokens per block (default 0.6)")
    b.add_argument("--methods", default=None,
                   help="comma-separated, or 'all' for every policy (default: original,timm,iared,ats,topk,random,"
                        "attention,tome,evit; timm: timm's own model on the same weights, unreduced)")
    b.add_argument("--warmup", type=int, default=2, help="untimed forwards per method (default 2)")
    b.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed rounds, each timing every method once; the median is reported (default: "
                        "at least 5, and until every method has --min-time seconds of timed forwards)")
    b.add_argument("--min-time", type=float, default=2.0,
                   help="seconds of timed forwards per method when --repeats is not given (default 2)")
    b.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    b.add_argument("--calib-images", type=_positive_int, default=8, help="calibration batch for the budgets")
    b.add_argument("--kernels", choices=("auto", "native", "onednn", "aten"), default="auto",
                   help="every method's layers: native (oneDNN linears with packed weights, and each ViT "
                        "block, ATS/EViT/ToMe block and IA-RED² stage of one image in one C++ call), "
                        "onednn (the linears only) or aten (PyTorch's default); auto: the first of these "
                        "that runs here")
    b.add_argument("--allocator", choices=("steady", "system"), default="steady",
                   help="steady: glibc keeps freed memory for reuse, so no method pays page faults for "
                        "fresh buffers on every forward (recorded as 'allocator'); system: leave malloc as is")
    b.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights, activations and inputs of every method (default float32)")
    b.add_argument("--flops-images", type=_positive_int, default=2, help="images counted exactly for GFLOPs")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common(b)
    b.set_defaults(func=_cmd_bench_speed)
    return parser


# -- command bodies: each builds a config and calls one library function ---------------

def _not_yet(name: str) -> int:
    print(f"iared {name}: not yet available in this version", file=sys.stderr)
    return 2


def _cmd_demo(args) -> int:
    import dataclasses

    from .commands.demo import DemoOptions, demo_command, run_demo

    options = DemoOptions(out=args.out, quick=args.quick, seed=args.seed, device=args.device)
    options = dataclasses.replace(options, command=demo_command(options))
    results = run_demo(options)
    i, o = results["methods"]["iared"], results["methods"]["original"]
    print(f"original top1 {o['top1']:.2f} | IA-RED² top1 {i['top1']:.2f} keeping {i['keep_ratio']:.2f} of the tokens, "
          f"{o['gflops_per_img'] / i['gflops_per_img']:.2f}x fewer GFLOPs -> {args.out}/report.md")
    return 0


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} expects comma-separated integers, got {text!r}") from None


def _run_flags(args) -> dict:
    """The options every training command shares (`_common`, `_training`, `--resume`)."""
    return dict(limit_batches=args.limit_batches, val_size=args.val_size, val_every=args.val_every,
                checkpoint_every=args.checkpoint_every, workers=args.workers, seed=args.seed, device=args.device,
                resume=args.resume, progress=not args.no_progress)


def _cmd_train_backbone(args) -> int:
    from .training.backbone import BackboneOptions, train_backbone

    options = BackboneOptions(
        data=args.data, arch=args.arch, out=args.out, embed_dim=args.embed_dim, depth=args.depth,
        num_heads=args.heads, patch_size=args.patch_size, patch_overlap=args.patch_overlap,
        epochs=args.epochs if args.epochs is not None else 10.0,
        batch_size=args.batch_size or 128, lr=args.lr if args.lr is not None else 1e-3,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        clutter_ramp=_int_list(args.clutter_ramp, "--clutter-ramp"), hflip=args.hflip, init=args.init,
        **_run_flags(args))
    summary = train_backbone(options)
    if summary.get("val"):
        print(f"val top1 {summary['val']['top1']:.2f} -> {options.out}/model.safetensors")
    return 0


def _cmd_train(args) -> int:
    from .training.curriculum import TrainOptions, train_iared

    try:
        schedule = tuple(float(v) for v in args.schedule.split(":"))
    except ValueError:
        raise UserError(f"--schedule expects E_p:E_b, e.g. 10:20, got {args.schedule!r}") from None
    options = TrainOptions(
        data=args.data, checkpoint=args.checkpoint, out=args.out, groups=args.groups, arch=args.arch,
        epochs=args.epochs if args.epochs is not None else 30.0, schedule=schedule, finetune=args.finetune,
        tau=args.tau, target=args.target, lr=args.lr if args.lr is not None else 4e-5, finetune_lr=args.finetune_lr,
        optimizer=args.optimizer,
        batch_size=args.batch_size or 64, label_smoothing=args.label_smoothing,
        **_run_flags(args))
    summary = train_iared(options)
    if summary.get("val"):
        v = summary["val"]
        print(f"val top1 {v['top1']:.2f}, keep ratio per group "
              f"{[round(k, 3) for k in v['keep_ratio_per_group']]} -> {options.out}/model.safetensors")
    return 0


def _floats(text: Optional[str], flag: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"{flag} expects comma-separated numbers, got {text!r}") from None


def _command_line(args) -> str:
    """The exact command line (`main` stores the arguments it parsed in `args.argv`)."""
    import shlex

    return shlex.join(["iared"] + list(getattr(args, "argv", None) or sys.argv[1:]))


def _cmd_eval(args) -> int:
    import torch

    from .commands.eval import EvalConfig, run_eval

    _check_output_file(args.json)
    torch.manual_seed(args.seed)
    cfg = EvalConfig(
        data=args.data, checkpoint=args.checkpoint, backbone=args.backbone, methods=args.methods, policy=args.policy,
        json_path=args.json, arch=args.arch, threshold=args.threshold, split=args.split,
        batch_size=args.batch_size, limit_batches=args.limit_batches,
        limit_images=args.limit_images, flops_images=args.flops_images, throughput=not args.no_throughput,
        allocator=args.allocator,
        segmentation=args.segmentation, mean=_floats(args.mean, "--mean"), std=_floats(args.std, "--std"),
        device=args.device, seed=args.seed, workers=args.workers, command=_command_line(args))
    out = run_eval(cfg)
    for name, r in out["methods"].items():
        if "clip1_err" in r:  # video
            speed = f"{r['clips_per_s']:.1f} clips/s" if r.get("clips_per_s") else "-"
            print(f"{name:>20s}  clip-1 err {r['clip1_err']:6.2f}  video-1 err {r['video1_err']:6.2f}  "
                  f"{r['gflops_per_clip']:.4f} GFLOPs  keep {r['keep_ratio']:.3f}  {speed}")
            continue
        speed = f"{r['img_per_s']:.1f} img/s" if r.get("img_per_s") else "-"
        acc = f"top1 {r['top1']:6.2f}  top5 {r['top5']:6.2f}" if r.get("top1") is not None else "(no labels)"
        print(f"{name:>20s}  {acc}  {r['gflops_per_img']:.4f} GFLOPs  keep {r['keep_ratio']:.3f}  {speed}")
    for name, m in (out.get("segmentation") or {}).items():
        print(f"{name:>20s}  heatmap pixel acc {m['pixel_acc']:.2f}  mIoU {m['mIoU']:.2f}  mAP {m['mAP']:.2f}")
    print(f"wrote {args.json}")
    return 0


def _cmd_interpret(args) -> int:
    from tqdm import tqdm

    from .commands.interpret import InterpretOptions, interpret

    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {args.alpha}")
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        raise UserError(f"unknown colormap {args.cmap!r} for --cmap")
    options = InterpretOptions(paths=tuple(args.paths), out=args.out, checkpoint=args.checkpoint,
                               method=args.method, policy=args.policy, arch=args.arch, device=args.device, cmap=args.cmap, alpha=args.alpha,
                               progress=not args.no_progress)
    # A bad input is one line naming it; the others are still processed, exit code 2 at the end.
    result = interpret(options, log=lambda line: tqdm.write(f"iared interpret: error: {line}", file=sys.stderr))
    for source, folder in result.outputs.items():
        print(f"{source} -> {folder}")
    return 0 if result.ok else 2


def _cmd_bench_speed(args) -> int:
    import torch

    from .backbones.kernels import resolve_kernels
    from .backbones.registry import create_model, list_models
    from .fileio import write_json
    from .commands.speed import DTYPES, SpeedConfig, bench_speed
    from .reduction.policy import available_policies

    if args.arch not in list_models():
        raise UserError(f"unknown --arch {args.arch!r}; see iared.list_models()")
    if args.img_size is not None:
        with torch.device("meta"):  # the architecture's own checks, without allocating weights
            try:
                create_model(args.arch, img_size=args.img_size)
            except ValueError as e:
                raise UserError(f"--img-size {args.img_size}: {e}") from None
    if not 0 < args.keep_ratio <= 1:
        raise UserError(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}")
    if not 0 <= args.min_time <= 600:
        raise UserError(f"--min-time must be in [0, 600] seconds, got {args.min_time}")
    try:
        resolve_kernels(args.kernels, args.device, DTYPES[args.dtype])
    except ValueError as e:
        raise UserError(f"--kernels: {e}") from None
    methods = None
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if not methods:
            raise UserError(f"--methods names no method: {args.methods!r}")
        unknown = [m for m in methods if m not in ("original", "timm", "all") and m not in available_policies()]
        if unknown:
            raise UserError(f"unknown method(s) {', '.join(unknown)}; available: original, timm, "
                            f"{', '.join(available_policies())}")
    _check_output_file(args.json)  # last: a bad flag leaves no folder behind
    cfg = SpeedConfig(arch=args.arch, img_size=args.img_size, batch_size=args.batch_size, keep_ratio=args.keep_ratio,
                      methods=methods, warmup=max(args.warmup, 0), repeats=args.repeats, min_time_s=args.min_time,
                      calib_images=args.calib_images, flops_images=args.flops_images, threads=args.threads,
                      kernels=args.kernels, dtype=args.dtype, allocator=args.allocator,
                      device=args.device, seed=args.seed, progress=not args.no_progress,
                      command=_command_line(args))
    out = bench_speed(cfg, log=lambda line: print(f"iared bench speed: {line}", file=sys.stderr))
    print(f"{out['arch']} {out['img_size']}px batch {out['batch_size']} on {out['device']}, {out['threads']} threads, "
          f"{out['dtype']}, {out['kernels']} kernels, allocator {out['allocator']}")
    for name, r in out["methods"].items():
        print(f"{name:>14s}  {r['img_per_s']:8.2f} img/s  {r['gflops_per_img']:7.3f} GFLOPs  keep {r['keep_ratio']:.3f}  "
              f"speedup {r['speedup']:.3f}  flops ratio {r['flops_ratio']:.3f}  ({r['of_limit']:.2f} of the limit)")
    write_json(args.json, out)
    print(f"wrote {args.json}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the "command" key of result files
    name = " ".join(filter(None, ["iared", args.command, getattr(args, "bench", None)]))  # as argparse names it
    set_program(name)
    try:
        args.device = _device(getattr(args, "device", None))
        return int(args.func(args) or 0)
    except UserError as e:
        if prints_here() and not isinstance(e, ErrorOnOtherRank) and not e.reported:
            report(str(e))
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
