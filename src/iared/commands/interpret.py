"""The interpreter tool (`iared interpret`): what an IA-RED² model looks at, per group.

The paper ships `python interpreter.py -p IMAGE -o OUTDIR` (Appendix B); this is it. For
every input it runs the model once (greedy interpreters, as at inference) and writes, into
`OUTDIR/<stem>/`:

* `panel.png` — the input as the model sees it, one heatmap overlay per group with the
  ratio of kept patches in the upper-left corner, and the patches finally kept; the
  prediction and its probability in the title (`frames.png` for a video: one column
  per frame, one row per group);
* `scores.json` — the informative scores of each group on the patch grid (nested lists,
  tokens dropped by an earlier group score 0), the grid shape, the kept masks and kept
  ratios per group, and the predicted class (name, index, probability) with the top 5.

Any other backbone (an iared model file, a timm-layout `.safetensors` file, or a `.pth` with
`arch`) is interpreted through a training-free policy given as `method` (`--method ats`,
`topk@0.6`, `random@0.65`, `tome@12`, ... as in `iared eval`): `panel.png` then has one
column per stage, the policy's scores as a heatmap where it has them (ATS, top-K,
attention), else the patches it keeps (random, EViT).

A ToMe model (policy "tome") has no scores; it is interpreted by its merges instead:
`panel.png` shows the input, each patch in the mean colour of the merged token covering it
after the last block (token borders drawn), and the patches whose own token is still
there; `scores.json` has `"scores": null`, a kept mask per block, and `"merged_into"`, the
grid cell of the token covering each cell after the last block.

`OUTDIR/summary.json` lists every input with its output folder, or the error it gave.

Inputs are decoded by `data.images.load_image` (any size, aspect ratio, grayscale, RGBA,
EXIF rotation) and prepared as the checkpoint's data config says (see `data_config`).
A bad input (missing, empty, not an image, truncated, too large) is reported in one line
and skipped; the other inputs are still processed. Every file is written atomically
(temp file + rename), and an input's files are written only once all of them are
computed, so nothing half-written is left behind.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..backbones.checkpoint import CheckpointError
from ..data.base import normalize
from ..data.images import load_image, resize_center_crop, to_tensor
from ..errors import UserError
from ..evaluation.figures import (atomic_write_bytes, figure_png, heatmap_panel, keep_ratio, kept_grid, merge_panel,
                                 video_strip)
from ..reduction.interpreter import has_interpreters
from ..reduction.tome import ToMePolicy

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
# Models whose input side is at least this are taken as photo models (ImageNet-like):
# shorter side resized, then centre-cropped; smaller canvases are resized whole.
CROP_MIN_SIDE = 128
PROGRESS_MIN_INPUTS = 4  # a progress bar only when there are more inputs than this


@dataclass(frozen=True)
class InterpretOptions:
    """What `iared interpret` does; the CLI fills it in."""

    paths: tuple[str, ...]          # images (or videos, for a video checkpoint)
    out: str                        # output folder (created)
    checkpoint: str                 # IA-RED² model file, or any backbone with `method`
    method: Optional[str] = None    # a training-free policy to interpret (e.g. "ats", "topk@0.6")
    policy: Optional[str] = None    # an IA-RED² policy file (interpreters) for the checkpoint's backbone
    arch: Optional[str] = None      # registry arch of a foreign checkpoint (see `iared eval --arch`)
    device: str = "cpu"             # torch device
    cmap: str = "jet"               # heatmap colormap
    alpha: float = 0.5              # heatmap weight in the overlay
    dpi: int = 120                  # PNG resolution
    progress: bool = True           # tqdm bar when there are many inputs


@dataclass
class InterpretResult:
    """What happened to each input."""

    outputs: dict[str, Path] = field(default_factory=dict)   # input path -> its output folder
    failures: dict[str, str] = field(default_factory=dict)   # input path -> one-line error

    @property
    def ok(self) -> bool:
        return not self.failures


# -- model and data config ----------------------------------------------------------------


@dataclass(frozen=True)
class InputConfig:
    """How an input file becomes the model's input tensor."""

    img_size: tuple[int, int]          # (H, W) the model takes
    in_chans: int                      # 1: grayscale, 3: RGB
    mean: tuple[float, ...]            # normalisation, per channel
    std: tuple[float, ...]
    resize: str                        # "crop": shorter side + centre crop; "resize": whole image
    crop_pct: float                    # with "crop": the crop covers this fraction of the short side
    class_names: tuple[str, ...]       # index -> name ("" list: indices are used)
    num_frames: int = 0                # T for a video model, 0 for images
    interpolation: str = "bicubic"     # resampling filter of the resize (timm's names)


def data_config(meta: dict[str, Any], model: nn.Module) -> InputConfig:
    """The input preparation a model file asks for.

    The data config stored at training time (`model.model_meta["data"]`: the `DataInfo`
    fields plus the spec) gives size, channels, mean/std and class names; what is missing
    falls back to the architecture (`img_size`, `in_chans`) and to ImageNet/0.5
    normalisation. Resizing: an explicit `"resize"` entry ("crop" / "resize") wins;
    otherwise ImageNet-like inputs (`imagefolder`/`videofolder` data, or a side of at
    least `CROP_MIN_SIDE`) are resized on the shorter side and centre-cropped as timm
    evaluates them, and small canvases (the 48x48 cluttered data, MNIST, CIFAR) are
    resized whole so that nothing of the picture is cut away.
    """
    data = meta.get("data") or {}
    cfg = model.config
    size = data.get("img_size", cfg.img_size)
    img_size = tuple(int(s) for s in size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    in_chans = int(data.get("in_chans", cfg.in_chans))
    if in_chans not in (1, 3):
        raise UserError(f"the model takes {in_chans} input channels; only 1 (grayscale) and 3 (RGB) images exist")
    default_mean, default_std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if in_chans == 3 else ((0.5,), (0.5,))
    pre = getattr(model, "pretrained_cfg", None) or {}  # the file's preprocessing (`iared.preprocess`) wins
    mean = tuple(float(v) for v in pre.get("mean", data.get("mean", default_mean)))
    std = tuple(float(v) for v in pre.get("std", data.get("std", default_std)))
    if len(mean) != in_chans or len(std) != in_chans:
        raise UserError(f"the checkpoint's data config has {len(mean)} means / {len(std)} stds for {in_chans} channels")
    resize = data.get("resize")
    if resize not in ("crop", "resize"):
        photo = data.get("kind") in ("imagefolder", "videofolder") or min(img_size) >= CROP_MIN_SIDE
        resize = "crop" if photo else "resize"
    num_frames = int(getattr(cfg, "num_frames", 0) or 0)
    return InputConfig(img_size=img_size, in_chans=in_chans, mean=mean, std=std, resize=resize,
                       crop_pct=float(pre.get("crop_pct", data.get("crop_pct", 0.875))),
                       interpolation=str(pre.get("interpolation", "bicubic")),
                       class_names=tuple(str(c) for c in data.get("class_names", ())), num_frames=num_frames)


def load_interpreter(checkpoint: str, device: str = "cpu", method: Optional[str] = None,
                     arch: Optional[str] = None, policy: Optional[str] = None) -> tuple[nn.Module, InputConfig]:
    """Load an IA-RED² model file and check it has interpreters that score tokens (or ToMe,
    which is then set to trace its merges); with `method`, load any backbone and patch it
    with that training-free policy instead; with `policy`, any backbone with the
    interpreters of that policy file.

    Raises:
        UserError: missing/truncated/unsafe file, no iared metadata, metadata that does
            not build a model or does not fit the weights, or a model without IA-RED²
            interpreters and no `method` (one-line messages naming the file).
    """
    from ..models import load_model

    if method is not None and policy is not None:
        raise UserError("--method and --policy exclude each other: one policy is interpreted at a time")
    if method is not None:
        model = _with_method(checkpoint, method, arch)
    elif policy is not None:
        from ..models import load_model_file, with_policy

        model = with_policy(load_model_file(checkpoint, arch), policy, checkpoint)
    else:
        try:
            model = load_model(checkpoint)
        except UserError as e:
            if str(checkpoint) in str(e):
                raise
            raise type(e)(f"{checkpoint}: {e}") from None  # say which file (e.g. weights that do not fit)
        except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
            # Metadata that names an unknown architecture, bad config fields, and the like.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot build the model of {checkpoint}: {first}") from None
        if not (has_interpreters(model) or isinstance(model.policy, ToMePolicy)):
            name = (model.model_meta.get("policy") or {}).get("name")
            raise UserError(f"{checkpoint} has no IA-RED² interpreters (policy: {name}); "
                            "train one with `iared train`, or pass --method ats (topk, random, ...)")
    if getattr(getattr(model, "policy", None), "name", None) == "tome":
        model.policy.trace_source = True  # the merges are what there is to show
    cfg = data_config(model.model_meta, model)
    return model.to(device).eval(), cfg


def _with_method(checkpoint: str, method: str, arch: Optional[str]) -> nn.Module:
    """`checkpoint`'s backbone patched with the one training-free policy `method` names."""
    from .eval import build_method, parse_methods
    from ..models import load_model_file
    from ..reduction.policy import available_policies

    specs = parse_methods(method, available_policies())
    if len(specs) != 1 or specs[0].name in ("original", "iared"):
        raise UserError(f"--method takes one training-free policy (e.g. ats, topk@0.6, random@0.65), got {method!r}")
    base = load_model_file(checkpoint, arch)
    model = build_method(base, specs[0])
    model.model_meta = getattr(base, "model_meta", {})
    return model


# -- inputs -------------------------------------------------------------------------------


def prepare_image(path: str, cfg: InputConfig) -> tuple[Tensor, Tensor]:
    """Decode an image file and shape it as the model's input.

    Returns:
        (x, shown): x (C, H, W) normalised for the model; shown the same picture in [0, 1]
        for drawing.

    Raises:
        ImageError: the file cannot be used (one line naming it).
    """
    img = load_image(path, mode="L" if cfg.in_chans == 1 else "RGB")
    H, W = cfg.img_size
    if cfg.resize == "crop":
        img = resize_center_crop(img, (H, W), cfg.crop_pct, cfg.interpolation)
    elif img.size != (W, H):
        from ..data.images import FILTERS

        img = img.resize((W, H), FILTERS[cfg.interpolation])
    shown = to_tensor(img)
    return normalize(shown, cfg.mean, cfg.std), shown


def prepare_video(path: str, cfg: InputConfig) -> tuple[Tensor, Tensor]:
    """Decode T uniformly spaced frames of a video, shorter side resized, centre crop.

    Returns:
        (x, shown): x (C, T, S, S) normalised; shown (C, T, S, S) in [0, 1].

    Raises:
        VideoError: the file cannot be decoded or is too short.
    """
    from ..data.video import decode_clip, spatial_crops

    side = cfg.img_size[0]
    clip = decode_clip(path, cfg.num_frames, side)                               # (T, H, W, 3) uint8
    v = torch.from_numpy(clip).permute(3, 0, 1, 2).float().div_(255.0)           # (3, T, H, W)
    if cfg.in_chans == 1:
        # ITU-R 601 luma, the weights of PIL's convert("L") used for grayscale images.
        v = (v * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1, 1)).sum(0, keepdim=True)
    shown = spatial_crops(v, side, views=1)[0]                                   # (C, T, S, S)
    m = torch.as_tensor(cfg.mean).view(-1, 1, 1, 1)
    s = torch.as_tensor(cfg.std).view(-1, 1, 1, 1)
    return (shown - m) / s, shown


# -- one forward ----------------------------------------------------------------------------


@torch.no_grad()
def run_interpreters(model: nn.Module, x: Tensor) -> dict[str, Any]:
    """One greedy forward of one input; the per-group scores and keep masks on the full grid.

    Args:
        model: an IA-RED²-patched model in eval mode.
        x: one input without batch dimension ((C, H, W) image or (C, T, H, W) clip).

    Returns:
        dict with "scores" and "keep" (lists over groups of (G,) float / bool tensors),
        "probs" (num_classes,); for a merging policy (ToMe) "scores" is None and "owner"
        (G,) gives the cell of the token covering each cell after the last block.
    """
    device = next(model.parameters()).device
    logits, info = model(x.unsqueeze(0).to(device), return_info=True)
    out = {"keep": [s.keep[0].cpu() for s in info.stages], "probs": logits[0].float().softmax(-1).cpu(),
           "blocks": [s.block for s in info.stages]}
    scores = [s.scores for s in info.stages]
    if scores and all(s is not None for s in scores):
        return {**out, "scores": [s[0].float().cpu() for s in scores]}
    if scores and "owner" in info.stages[-1].extras:
        return {**out, "scores": None, "owner": info.stages[-1].extras["owner"][0].cpu()}
    if scores:  # a policy that keeps without scoring (random) or not at every stage: kept patches only
        return {**out, "scores": None}
    raise UserError("the model's policy records no stage")


def prediction(probs: Tensor, class_names: Sequence[str], k: int = 5) -> dict[str, Any]:
    """The predicted class and the top k, with names where the data config has them."""
    top = probs.topk(min(k, probs.numel()))

    def name(i: int) -> str:
        return class_names[i] if i < len(class_names) else str(i)

    i = int(top.indices[0])
    return {"index": i, "class": name(i), "probability": float(top.values[0]),
            "top5": [{"index": int(j), "class": name(int(j)), "probability": float(p)}
                     for p, j in zip(top.values, top.indices)]}


def scores_record(out: dict[str, Any], grid_shape: Sequence[int], pred: dict[str, Any],
                  source: str, checkpoint: str, order: Optional[str] = None) -> dict[str, Any]:
    """The `scores.json` content of one input (see the module docstring).

    Args:
        out: `run_interpreters`' result.
        grid_shape: (h, w) for an image, (T, h, w) for a clip.
        pred: `prediction`'s result.
        source: the input path.
        checkpoint: the model file.
        order: how the flat grid maps to `grid_shape` (documented for video).
    """
    def shaped(t: Tensor) -> Tensor:
        if len(grid_shape) == 3:  # JointST grid n * T + t -> (T, h, w)
            from ..backbones.jointst import frame_maps

            T, h, w = grid_shape
            return frame_maps(t.reshape(1, -1), T, (h, w))[0]
        return t.reshape(*grid_shape)

    return {
        "input": source,
        "checkpoint": checkpoint,
        "kind": "video" if len(grid_shape) == 3 else "image",
        "grid_shape": list(grid_shape),
        "grid_order": order or "row-major (row * w + col)",
        "groups": len(out["keep"]),
        "stage_blocks": out.get("blocks"),
        "scores": None if out["scores"] is None else
                  [np.round(shaped(s).numpy().astype(np.float64), 6).tolist() for s in out["scores"]],
        "keep": [shaped(k.to(torch.int64)).tolist() for k in out["keep"]],
        "keep_ratio_per_group": [keep_ratio(k) for k in out["keep"]],
        "keep_ratio": keep_ratio(out["keep"][-1]) if out["keep"] else 1.0,
        "prediction": {k: v for k, v in pred.items() if k != "top5"},
        "top5": pred["top5"],
        **({"merged_into": shaped(out["owner"]).tolist()} if "owner" in out else {}),
    }


# -- naming and the whole run ---------------------------------------------------------------


def output_names(paths: Sequence[str]) -> list[str]:
    """A distinct, filesystem-safe folder name per input, from its file stem.

    Repeated stems (``a/x.jpg``, ``b/x.png``) get ``x``, ``x_2``, ``x_3``... in input
    order; names are compared case-insensitively so they stay distinct on
    case-insensitive file systems too.
    """
    names, seen = [], set()
    for p in paths:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(p).stem).strip("._") or "input"
        name, n = stem, 1
        while name.lower() in seen:
            n += 1
            name = f"{stem}_{n}"
        seen.add(name.lower())
        names.append(name)
    return names


def _title(source: str, pred: dict[str, Any]) -> str:
    return f"{Path(source).name}: {pred['class']} ({100 * pred['probability']:.1f}%)"


def interpret_one(model: nn.Module, cfg: InputConfig, source: str, out_dir: Path, checkpoint: str,
                  options: InterpretOptions) -> dict[str, Any]:
    """Prepare one input, run the model, write its figure and `scores.json` into `out_dir`.

    Returns:
        the `scores.json` record.

    Raises:
        UserError (ImageError, VideoError): the input cannot be used; nothing is written.
    """
    is_video = cfg.num_frames > 0
    if not is_video and Path(source).suffix.lower() in VIDEO_EXTENSIONS:
        raise UserError(f"{source} is a video but the checkpoint is an image model")
    if is_video:
        x, shown = prepare_video(source, cfg)
        h, w = model.frame_grid
        grid_shape, order = (cfg.num_frames, h, w), "JointST n * T + t, reshaped to (T, h, w)"
    else:
        x, shown = prepare_image(source, cfg)
        h, w = model.patch_embed.grid_size
        grid_shape, order = (h, w), None
    out = run_interpreters(model, x)
    if is_video and out["scores"] is None:
        raise UserError("merge panels (ToMe) are drawn for image models only")
    pred = prediction(out["probs"], cfg.class_names)
    record = scores_record(out, grid_shape, pred, source, checkpoint, order)
    if "owner" in out:
        fig = merge_panel(shown, out["owner"], out["keep"][-1], (h, w), len(out["keep"]), title=_title(source, pred))
        fig_name = "panel.png"
    elif is_video:
        fig = video_strip(shown, out["scores"], out["keep"], cfg.num_frames, (h, w), title=_title(source, pred),
                          cmap=options.cmap, alpha=options.alpha)
        fig_name = "frames.png"
    elif out["scores"] is None:
        fig = kept_grid([shown], {f"block {b}": [k] for b, k in zip(out["blocks"], out["keep"])}, (h, w),
                        title=_title(source, pred))
        fig_name = "panel.png"
    else:
        foreign = options.method is not None  # a training-free policy's scores have no fixed scale
        fig = heatmap_panel(shown, out["scores"], out["keep"], (h, w), title=_title(source, pred),
                            cmap=options.cmap, alpha=options.alpha, normalize=foreign,
                            labels=[f"block {b}" for b in out["blocks"]] if foreign else None)
        fig_name = "panel.png"
    png = figure_png(fig, options.dpi)  # rendered before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / fig_name, png)
    atomic_write_bytes(out_dir / "scores.json", json.dumps(record, indent=1).encode())
    return record


def interpret(options: InterpretOptions, log: Optional[Callable[[str], None]] = None) -> InterpretResult:
    """Run the interpreter tool on every input of `options` (see the module docstring).

    Args:
        options: inputs, output folder, checkpoint, drawing options.
        log: called with one line per failed input (default: stderr).

    Returns:
        which inputs were written where, and which failed with what message.

    Raises:
        UserError: the checkpoint cannot be used (nothing is processed).
    """
    from tqdm import tqdm

    model, cfg = load_interpreter(options.checkpoint, options.device, options.method, options.arch, options.policy)
    out_root = Path(options.out)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out_root}: {e.strerror or e}") from None
    result = InterpretResult()
    summary = []
    bar = tqdm(list(zip(options.paths, output_names(options.paths))), desc="interpret", unit="input",
               file=sys.stderr, disable=not options.progress or len(options.paths) <= PROGRESS_MIN_INPUTS)
    say = log or (lambda line: tqdm.write(line, file=sys.stderr))
    for source, name in bar:
        try:
            record = interpret_one(model, cfg, source, out_root / name, options.checkpoint, options)
        except UserError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if source not in msg:
                msg = f"{source}: {msg}"
            result.failures[source] = msg
            summary.append({"input": source, "error": msg})
            say(msg)
            continue
        result.outputs[source] = out_root / name
        summary.append({"input": source, "output": name, "prediction": record["prediction"],
                        "keep_ratio_per_group": record["keep_ratio_per_group"]})
    atomic_write_bytes(out_root / "summary.json", json.dumps(
        {"checkpoint": options.checkpoint, "inputs": summary}, indent=1).encode())
    return result


__all__ = ["InputConfig", "InterpretOptions", "InterpretResult", "data_config", "interpret", "interpret_one",
           "load_interpreter", "output_names", "prepare_image", "prepare_video", "run_interpreters"]
