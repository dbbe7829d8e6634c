"""`iared eval`: every method on one checkpoint and one data set, written as the JSON of docs/results-format.md.

Methods are named as in the README, each with an optional budget knob after `@`, so a sweep
draws a trade-off curve:

    original                    the backbone (`backbone`, else the checkpoint's blocks), no policy
    iared[@T]                   the checkpoint's own interpreters, keep threshold T (default: as saved;
                                iared@0 keeps every token: the checkpoint's blocks alone)
    ats[@RHO]                   multi-stage ATS, K = max(round(RHO * all tokens), 8) at every stage
                                (ats@compound=true: RHO scales the tokens entering each stage)
    ats_single[@RHO]            single-stage ATS (use ats_single@K=48 for a fixed K)
    topk[@RHO], ats_selfattn[@RHO], ats_nocls[@RHO]   the ATS variants, same knob
    random[@R], attention[@R]   drop at the input, keep ratio R (default 0.7)
    tome[@R]                    ToMe: merge R tokens in every block
    evit[@RHO]                  EViT: keep rate RHO at blocks 3, 6, 9 (the rest fused into one token)
    tempdiff[@R]                video: keep the patches that changed most since the last frame

`NAME@KEY=VALUE` sets any setting of the policy instead (several joined by `+`, e.g.
`ats@K=48+stages=3`; a stage list is written `3-11` for a range). The method string
itself is the key under "methods" in the JSON, so `ats@0.7,ats@0.5` are two entries.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..backbones.kernels import resolve_kernels
from ..errors import UserError
from ..evaluation.throughput import interleaved_throughput, steady_allocator
from ..evaluation.segmentation import segmentation_metrics_for
from ..fileio import write_json
from ..models import check_data_fits, load_model_file, with_policy
from ..reduction.interpreter import has_interpreters
from ..reduction.policy import budget_setting
from .compare import compare_methods, relative_to_original

MAX_RANGE = 1024  # a setting's "a-b" range lists blocks: far fewer than this


@dataclass(frozen=True)
class MethodSpec:
    """One entry of `--methods`: its label (the text given), policy name and settings."""

    label: str                                   # e.g. "ats@0.7", the key in the JSON
    name: str                                    # "original", "iared" or a registered policy
    settings: dict[str, Any] = field(default_factory=dict)  # policy keyword arguments


def _value(text: str) -> Any:
    text = text.strip()
    rng = re.fullmatch(r"(\d+)-(\d+)", text)
    if rng:  # "3-11": the blocks 3..11
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if not 0 <= hi - lo <= MAX_RANGE:
            raise UserError(f"range {text!r} must run upwards over at most {MAX_RANGE} values")
        return list(range(lo, hi + 1))
    if "," in text:  # "2,3": a list (of blocks, or of one K per stage)
        return [_value(v) for v in text.split(",")]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "none":
        return None
    raise UserError(f"cannot read method setting value {text!r}")


def _method_labels(text: str) -> list[str]:
    """Split `--methods` at its commas, except those inside a setting's list of numbers:
    a part starting with a digit continues the setting before it ("ats@stages=2,3")."""
    labels: list[str] = []
    for part in (t.strip() for t in text.split(",")):
        if part[:1].isdigit() and labels and "=" in labels[-1]:
            labels[-1] += "," + part
        elif part:
            labels.append(part)
    return labels


def parse_methods(text: str, available: Sequence[str]) -> list[MethodSpec]:
    """Parse `--methods` ("original,ats@0.7,random@keep_ratio=0.5", see the module docstring).

    Args:
        text: the comma-separated list.
        available: registered policy names (besides "original").

    Returns:
        One MethodSpec per entry, in order.

    Raises:
        UserError: empty list, unknown method, duplicate entry, or a malformed knob.
    """
    specs: list[MethodSpec] = []
    for label in _method_labels(text):
        name, _, knob = label.partition("@")
        name = name.strip()
        if name != "original" and name not in available:
            raise UserError(f"unknown method {name!r}; available: original, {', '.join(sorted(available))}")
        settings: dict[str, Any] = {}
        if knob:
            if name == "original":
                raise UserError("method 'original' takes no budget")
            for part in knob.split("+"):
                key, eq, val = part.partition("=")
                if eq:
                    settings[key.strip()] = _value(val)
                elif budget_setting(name):  # NAME@VALUE: the policy's budget
                    settings[budget_setting(name)] = _value(key)
                else:
                    raise UserError(f"method {name!r} has no default knob: write {name}@SETTING=VALUE")
        if any(s.label == label for s in specs):
            raise UserError(f"method {label!r} is listed twice")
        specs.append(MethodSpec(label, name, settings))
    if not specs:
        raise UserError("--methods is empty")
    return specs


@dataclass(frozen=True)
class EvalConfig:
    """Everything `iared eval` needs (the CLI fills it in)."""

    data: str                                   # KIND[:PATH]
    checkpoint: str                             # iared .safetensors model file, or a foreign .pth/.pt with arch
    backbone: Optional[str] = None              # model for "original" and every baseline (default: the
                                                # checkpoint's blocks; after fine-tuning, pass the backbone
                                                # the IA-RED² model was trained from, as the paper compares)
    methods: str = "original,iared"             # see the module docstring
    policy: Optional[str] = None                # IA-RED² policy file (interpreters) for the checkpoint's backbone
    json_path: Optional[str] = None             # where the results go (None: not written)
    arch: Optional[str] = None                  # registry name for a foreign checkpoint
    threshold: Optional[float] = None           # iared keep threshold override (default: the saved one)
    split: str = "test"                         # which split to evaluate
    batch_size: int = 64                        # evaluation batch size
    limit_batches: Optional[int] = None         # stop after this many batches
    limit_images: Optional[int] = None          # evaluate only the first N images
    flops_images: int = 32                      # GFLOPs averaged over the first N images (one at a time)
    throughput: bool = True                     # measure img_per_s (on one batch of batch_size images)
    throughput_repeats: int = 5                 # timed repetitions (median)
    allocator: str = "steady"                   # "steady": `steady_allocator()` before timing; "system"
    segmentation: bool = False                  # heatmap segmentation metrics (data with masks)
    mean: Optional[tuple[float, ...]] = None    # input normalisation (default: the model's preprocessing,
    std: Optional[tuple[float, ...]] = None     # `model.pretrained_cfg`, else the data set's own)
    device: str = "cpu"
    seed: int = 0                               # seeds the random baseline and torch
    workers: int = 0                            # data-loading processes
    command: str = ""                           # the exact command line, recorded in the JSON
    progress: bool = True                       # progress bars


def build_method(model: nn.Module, spec: MethodSpec, seed: int = 0, threshold: Optional[float] = None) -> nn.Module:
    """A copy of `model` set up for one method (the original model is not touched).

    "original" is the bare backbone, "iared" the checkpoint's own interpreters, any other
    name the bare backbone patched with that policy.
    """
    from ..patch import patch, unpatch

    if spec.name == "iared":
        if not has_interpreters(model):
            raise UserError("method 'iared' needs an IA-RED² checkpoint (written by iared train)")
        m = copy.deepcopy(model)
        unknown = set(spec.settings) - {"threshold"}
        if unknown:
            raise UserError(f"method 'iared' takes only a threshold, got {', '.join(sorted(unknown))}")
        t = spec.settings.get("threshold", threshold)
        if t is not None:
            # Scores are in (0, 1): 0 keeps every token, 1 none; beyond that a value says nothing more.
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
                raise UserError(f"method {spec.label!r}: threshold must be in [0, 1], got {t}")
            m.policy.threshold = float(t)
        return m
    m = copy.deepcopy(model)
    if getattr(m, "policy", None) is not None:
        unpatch(m)
    if spec.name == "original":
        return m
    settings = dict(spec.settings)
    if spec.name == "random":
        settings.setdefault("seed", seed)
    try:
        return patch(m, policy=spec.name, **settings)
    except (TypeError, ValueError) as e:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unknown:  # say it in the user's terms, not the constructor's
            raise UserError(f"method {spec.label!r}: {spec.name} has no setting {unknown.group(1)!r}") from None
        raise UserError(f"method {spec.label!r}: {str(e).splitlines()[0]}") from None


def _dataset(cfg: EvalConfig, model: nn.Module, **kw: Any):
    from ..data import build_dataset

    # The model's own preprocessing (`model.pretrained_cfg`); --mean/--std override it.
    if cfg.mean is not None:
        kw["mean"] = tuple(cfg.mean)
    if cfg.std is not None:
        kw["std"] = tuple(cfg.std)
    try:
        ds = build_dataset(cfg.data, cfg.split, seed=cfg.seed, preprocess=getattr(model, "pretrained_cfg", None), **kw)
    except TypeError as e:  # a kind without these options (normalisation, video views)
        wanted = "video options (views, frames): is it a video data set?" if "views" in kw else "--mean/--std"
        raise UserError(f"data {cfg.data!r} does not accept {wanted} ({e})") from None
    check_data_fits(ds.info, model, cfg.data)
    if ds.info.num_classes == 0 and not cfg.segmentation:
        raise UserError(f"data {cfg.data!r} has no labels: accuracy needs labelled images "
                        f"(--segmentation works without)")
    if cfg.limit_images is not None:
        ds = _Subset(ds, range(min(cfg.limit_images, len(ds))))
    return ds


class _Subset(torch.utils.data.Subset):
    """`Subset` that keeps the data set's `.info`."""

    @property
    def info(self):
        return self.dataset.info


def _first_images(ds, n: int) -> torch.Tensor:
    return torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every method of `cfg.methods` and write the JSON (docs/results-format.md) if asked.

    Returns:
        The results dict that was written.

    Raises:
        UserError: bad checkpoint, data, method or mismatch between them (one line).
    """
    from ..reduction.policy import available_policies

    specs = parse_methods(cfg.methods, available_policies())
    torch.manual_seed(cfg.seed)
    # Before anything is allocated, as `iared bench speed` (why: `steady_allocator`).
    allocator = steady_allocator() if cfg.allocator == "steady" else "system"
    model, base = _load_models(cfg)
    if hasattr(model, "num_frames"):  # a video model: the paper's Table 3 protocol
        if cfg.segmentation:
            raise UserError("--segmentation is for image models on data with pixel masks, not video")
        return run_video_eval(cfg, model, base, specs, allocator)
    ds = _dataset(cfg, model)
    if cfg.segmentation and not ds.info.has_masks:  # before the evaluation, not after it
        raise UserError(f"data {cfg.data!r} has no pixel masks: --segmentation needs a kind with masks "
                        f"(cluttered-digits, cluttered-fashion, segfolder:DIR)")
    flops_images = _first_images(ds, cfg.flops_images).to(cfg.device)
    speed_images = _first_images(ds, cfg.batch_size).to(cfg.device) if cfg.throughput else None
    rows = ((spec.label, m) for spec, m in _method_models(cfg, model, base, specs))
    results = compare_methods(
        rows, _loader(cfg, ds), flops_images, device=cfg.device, limit_batches=cfg.limit_batches,
        labeled=ds.info.num_classes > 0, speed_batches=() if speed_images is None else (speed_images,),
        repeats=(cfg.throughput_repeats,), progress=cfg.progress)
    for spec in specs:
        if spec.name == "iared":
            results[spec.label]["keep_ratio_per_group"] = results[spec.label]["keep_ratio_per_stage"]
    out = _eval_record(cfg, allocator, results, flops_images, speed_images)
    if cfg.segmentation:
        out["segmentation"] = _segmentation(cfg, model, base, ds)
    if cfg.json_path:
        write_json(cfg.json_path, out)
    return out


def _load_models(cfg: EvalConfig) -> tuple[nn.Module, nn.Module]:
    """The checkpoint's model (with `cfg.policy` attached if given) and the backbone the baselines run on."""
    model = load_model_file(cfg.checkpoint, cfg.arch)
    if cfg.policy is not None:
        model = with_policy(model, cfg.policy, cfg.checkpoint)
    model = model.to(cfg.device)
    return model, load_backbone_for_eval(cfg, model)


def _loader(cfg: EvalConfig, ds) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers)


def _eval_record(cfg: EvalConfig, allocator: str, results: dict[str, Any], flops_images: torch.Tensor,
                 speed_images: Optional[torch.Tensor]) -> dict[str, Any]:
    """The result file: where the numbers come from, how they were measured, and the rows."""
    return {
        **_provenance(cfg, allocator),
        "notes": {
            "gflops_per_img": f"multiply-adds / 1e9 per image, counted one image at a time on the first "
                              f"{int(flops_images.shape[0])} images",
            "img_per_s": "not measured (--no-throughput)" if speed_images is None else
                         f"median of {cfg.throughput_repeats} timed forwards of one batch of "
                         f"{int(speed_images.shape[0])} images, methods timed round-robin",
            "keep_ratio": "fraction of patch tokens alive after the last stage; token_ratio: mean over blocks "
                          "of tokens entering the block / all tokens",
            "top1_se": "binomial standard error of top1, in points",
        },
        "methods": results,
    }


def _provenance(cfg: EvalConfig, allocator: str) -> dict[str, Any]:
    """What every result file of `iared eval` records first: its inputs, command and machine."""
    return {"data": cfg.data, "checkpoint": cfg.checkpoint, "backbone": cfg.backbone or cfg.checkpoint,
            "command": cfg.command, "split": cfg.split, "device": cfg.device, "threads": torch.get_num_threads(),
            "kernels": resolve_kernels("auto", cfg.device), "allocator": allocator}


def run_video_eval(cfg: EvalConfig, model: nn.Module, base: nn.Module, specs: Sequence[MethodSpec],
                   allocator: str = "system", dataset: Optional[Any] = None) -> dict[str, Any]:
    """`run_eval` on video data: the paper's Table 3 row per method (the video keys of docs/results-format.md).

    `allocator` is what `run_eval` set up before timing, recorded in the result;
    `dataset` (three views per video) replaces the one `cfg.data` describes.

    Three views per video (left, centre, right crops): clip-1 error on the centre view,
    video-1 error on the three averaged; clips/s of every method timed round-robin on
    the same centre-view clips (`interleaved_throughput`), GFLOPs per clip, keep ratio.
    """
    from ..evaluation.video import CENTRE_VIEW, evaluate_video

    ds = _dataset(cfg, model, views=3, num_frames=model.num_frames) if dataset is None else dataset
    limit = None if cfg.limit_batches is None else cfg.limit_batches * cfg.batch_size
    rows: dict[str, Any] = {}
    timed: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    for spec, m in _method_models(cfg, model, base, specs):
        policy = getattr(m, "policy", None)
        mode = "greedy" if spec.name == "iared" else None
        row = evaluate_video(m, ds, batch_size=cfg.batch_size, mode=mode, limit=limit, device=cfg.device,
                             speed_repeats=0, flops_clips=cfg.flops_images, progress=cfg.progress)
        row["policy"] = policy.config() if hasattr(policy, "config") else None
        rows[spec.label] = row
        timed[spec.label] = (m, {"mode": mode} if mode else {})
    speeds: dict[str, float] = {}
    if cfg.throughput:
        clips = torch.stack([ds[i]["video"][CENTRE_VIEW] for i in range(min(cfg.batch_size, len(ds)))])
        speeds = interleaved_throughput(timed, clips.to(cfg.device), warmup=1, repeats=cfg.throughput_repeats)
    for label, row in rows.items():
        row["clips_per_s"] = speeds.get(label)
    relative_to_original(rows, "gflops_per_clip", "clips_per_s")
    out = {
        **_provenance(cfg, allocator),
        "notes": {"clip1_err": "top-1 error (%) of the centre view", "video1_err":
                  "top-1 error (%) of the softmax averaged over left, centre and right views",
                  "clips_per_s": f"median of {cfg.throughput_repeats} forwards of the same centre-view clips, "
                                 "methods timed round-robin", "gflops_per_clip": "multiply-adds / 1e9 per clip"},
        "methods": rows,
    }
    if cfg.json_path:
        write_json(cfg.json_path, out)
    return out


def _method_models(cfg: EvalConfig, model: nn.Module, base: nn.Module,
                   specs: Sequence[MethodSpec]) -> Iterator[tuple[MethodSpec, nn.Module]]:
    """(spec, model) of every method, one at a time. Each is set up once beforehand and
    dropped, so a budget out of range fails in seconds, not after the methods before it
    have run over the whole split, while only one extra copy of the model is ever held."""
    for spec in specs:
        _method_model(cfg, model, base, spec)
    for spec in specs:
        yield spec, _method_model(cfg, model, base, spec)


def _method_model(cfg: EvalConfig, model: nn.Module, base: nn.Module, spec: MethodSpec) -> nn.Module:
    """The model one method runs: "iared" on the checkpoint, everything else on `base`; eval mode."""
    m = build_method(model if spec.name == "iared" else base, spec, cfg.seed, cfg.threshold).to(cfg.device).eval()
    policy = getattr(m, "policy", None)
    if hasattr(policy, "reset"):
        policy.reset()  # the random baseline: same draws whatever ran before
    return m


def _segmentation(cfg: EvalConfig, model: nn.Module, base: nn.Module, ds) -> dict[str, Any]:
    explained: dict[str, nn.Module] = {}
    if has_interpreters(model):
        m = copy.deepcopy(model).to(cfg.device).eval()
        if cfg.threshold is not None:
            m.policy.threshold = cfg.threshold
        # "iared": the paper's heatmap (second group); each group's scores as well.
        explained.update({name: m for name in ["iared", *(f"iared@group={j}" for j in range(m.policy.groups))]})
    b = base.to(cfg.device).eval()
    explained.update({name: b for name in ("attention", "rollout", "gradcam", "chefer")})
    # One pass over the data for every explainer: decoding the images is the slow part on photos.
    return segmentation_metrics_for(b, _loader(cfg, ds), explained, cfg.device, cfg.limit_batches)


def load_backbone_for_eval(cfg: EvalConfig, model: nn.Module) -> nn.Module:
    """The model "original" and the baselines run on: `cfg.backbone`, else `model` itself.

    Raises:
        UserError: the backbone file is missing, carries a policy, or does not match the
            checkpoint's input and classes.
    """
    if not cfg.backbone:
        return model
    base = load_model_file(cfg.backbone, cfg.arch)
    if getattr(base, "policy", None) is not None:
        raise UserError(f"--backbone {cfg.backbone} has a token policy: pass the plain backbone model file")
    a, b = model.config, base.config
    if (a.num_classes, a.in_chans, tuple(model.patch_embed.img_size)) != \
            (b.num_classes, b.in_chans, tuple(base.patch_embed.img_size)):
        raise UserError(f"--backbone {cfg.backbone} ({b.num_classes} classes, {b.in_chans} channels, "
                        f"{base.patch_embed.img_size[0]} px) does not match the checkpoint ({a.num_classes} classes, "
                        f"{a.in_chans} channels, {model.patch_embed.img_size[0]} px)")
    return base.to(cfg.device)
