"""Training a plain ViT from scratch (`iared train-backbone`), for data with no pretrained model.

Recipe (DeiT-like, shrunk): AdamW, linear warmup then cosine decay, label smoothing, and
augmentation that keeps masks valid: the cluttered data sets draw new item positions and
new clutter every epoch (`set_epoch`), optionally with fewer clutter fragments in the
first epochs (`clutter_ramp`), which gets a small ViT off the ground much faster than
starting on fully cluttered canvases. An optional horizontal flip (`hflip`) suits data
whose classes are mirror-symmetric (Fashion-MNIST, CIFAR-10; not digits).

The result is one self-contained model file (`iared.save_model`): architecture, weights
and the data config, so later commands need nothing else.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..backbones.registry import create_model, list_models
from ..errors import UserError
from .distributed import DistInfo, agree, broadcast_parameters, device_for, run_training
from .loop import Stage, run_stages
from .setup import check_output_dir, data_info_dict, finish_run, load_data, loop_settings


@dataclass(frozen=True)
class BackboneOptions:
    """Everything `train_backbone` needs; the CLI fills it in."""

    data: str                              # data spec KIND[:PATH]
    arch: str                              # registry name; "vit_custom" takes its size from the flags below
    out: str                               # run folder: model.safetensors, metrics.json, checkpoints/
    embed_dim: Optional[int] = None        # token width (vit_custom default 64)
    depth: Optional[int] = None            # number of blocks (vit_custom default 6)
    num_heads: Optional[int] = None        # attention heads (vit_custom default 4)
    patch_size: Optional[int] = None       # patch side in pixels (vit_custom default 4)
    patch_overlap: Optional[int] = None    # pixels each patch kernel sees beyond its patch (vit_custom default 0)
    init: Optional[str] = None             # start from this model file's weights (same architecture)
    epochs: float = 10.0                   # training length in epochs
    batch_size: int = 128                  # images per step and process
    lr: float = 1e-3                       # peak AdamW learning rate
    weight_decay: float = 0.05             # AdamW decoupled weight decay
    warmup_epochs: float = 0.3             # linear warmup length, in epochs
    label_smoothing: float = 0.1           # cross-entropy label smoothing
    clutter_ramp: tuple[int, ...] = ()     # clutter fragments in epochs 0, 1, ... (then the data default)
    hflip: bool = False                    # random horizontal flips (mirror-symmetric classes only)
    limit_batches: Optional[int] = None    # stop each epoch after N steps (tiny runs, tests)
    val_size: Optional[int] = None         # validate on the first N validation items (None: all)
    val_every: int = 1                     # validate every N epochs (and after the last)
    checkpoint_every: int = 100            # steps between checkpoints
    workers: int = 0                       # DataLoader worker processes
    seed: int = 0                          # initialisation, data order, generated data
    device: str = "cpu"                    # "cpu" or "cuda"
    resume: bool = False                   # continue the run in `out`
    progress: bool = True                  # tqdm progress bars

    def check(self) -> None:
        """Raise `UserError` on a setting no run can use (before any process starts)."""
        if not self.epochs > 0 or not self.lr > 0:
            raise UserError(f"--epochs and --lr must be positive, got {self.epochs} and {self.lr}")
        if self.clutter_ramp and any(k < 0 for k in self.clutter_ramp):
            raise UserError("--clutter-ramp takes non-negative fragment counts")


VIT_CUSTOM_DEFAULTS = {"embed_dim": 64, "depth": 6, "num_heads": 4, "patch_size": 4, "patch_overlap": 0}


def build_backbone(arch: str, info: Any, embed_dim: Optional[int] = None, depth: Optional[int] = None,
                   num_heads: Optional[int] = None, patch_size: Optional[int] = None,
                   patch_overlap: Optional[int] = None) -> tuple[nn.Module, dict[str, Any]]:
    """A randomly initialised registry model sized for the data (`info`: a `DataInfo`).

    Returns:
        (model, the overrides passed to `create_model`).

    Raises:
        UserError: unknown arch, or a size that does not fit (heads not dividing the
            width, patch not dividing the image).
    """
    if arch not in list_models():
        raise UserError(f"unknown --arch {arch!r}; available: {', '.join(list_models())}")
    sizes = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "patch_size": patch_size,
             "patch_overlap": patch_overlap}
    if arch == "vit_custom":
        sizes = {k: (v if v is not None else VIT_CUSTOM_DEFAULTS[k]) for k, v in sizes.items()}
    sizes = {k: v for k, v in sizes.items() if v is not None}
    overrides = {"img_size": list(info.img_size), "in_chans": info.in_chans, "num_classes": info.num_classes, **sizes}
    width = overrides.get("embed_dim")
    heads = overrides.get("num_heads")
    if width is not None and heads is not None and width % heads:
        raise UserError(f"--heads {heads} must divide --embed-dim {width}")
    p = overrides.get("patch_size")
    if p is not None and any(s % p for s in info.img_size):
        raise UserError(f"--patch-size {p} does not divide the image size {tuple(info.img_size)}")
    try:
        model = create_model(arch, **overrides)
    except (ValueError, AssertionError, TypeError) as e:
        raise UserError(f"cannot build {arch} for this data: {e}") from None
    return model, overrides


def _load_init(model: nn.Module, path: str) -> None:
    """Continue from a model file's weights (e.g. a longer schedule after a short one)."""
    from ..backbones.checkpoint import CheckpointError, load_pretrained

    try:
        load_pretrained(model, path)
    except CheckpointError as e:
        raise UserError(f"--init {path} does not fit this architecture: {e}") from None


def classify_step(model: nn.Module, batch: dict[str, Any], generator: torch.Generator, *,
                  label_smoothing: float = 0.0, hflip: bool = False) -> dict[str, Any]:
    """The plain classification task: cross-entropy on (optionally flipped) images."""
    images, labels = batch["image"], batch["label"]
    if hflip:
        flip = torch.rand(images.shape[0], generator=generator) < 0.5
        images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)
    logits = model(images)
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    acc = (logits.argmax(-1) == labels).float().mean() * 100
    return {"loss": loss, "output": logits, "metrics": {"loss": float(loss.detach()), "acc": float(acc)}}


def _epoch_data(options: BackboneOptions, train: Dataset):
    """epoch -> training data: clutter ramp first, the data set itself afterwards."""
    info = train.info
    ramped: dict[int, Dataset] = {}

    def data_for(epoch: int) -> Dataset:
        ds = train
        if epoch < len(options.clutter_ramp) and hasattr(train, "num_fragments"):
            k = options.clutter_ramp[epoch]
            if k != train.num_fragments:
                if k not in ramped:
                    # Same normalisation as the full data, so the ramp changes content only.
                    ramped[k] = load_data(options.data, "train", options.seed, num_fragments=k,
                                          mean=info.mean, std=info.std)
                ds = ramped[k]
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        return ds

    return data_for


def _train_backbone(options: BackboneOptions, dist_info: DistInfo) -> dict[str, Any]:
    t0 = time.time()

    def prepare():
        train = load_data(options.data, "train", options.seed)
        val = load_data(options.data, "val", options.seed)
        torch.manual_seed(options.seed)
        model, overrides = build_backbone(options.arch, train.info, options.embed_dim, options.depth,
                                          options.num_heads, options.patch_size, options.patch_overlap)
        if options.init:
            _load_init(model, options.init)
        if dist_info.is_main:
            check_output_dir(Path(options.out))  # last: a bad argument leaves no empty folder behind
        return train, val, model, overrides

    train, val, model, overrides = agree(dist_info, prepare)
    info = train.info
    device = device_for(options.device, dist_info)
    model.to(device)
    broadcast_parameters(model, dist_info)

    loop, run_config = loop_settings(options, dist_info.world_size)
    n_steps_epoch = max(1, len(train) // (options.batch_size * dist_info.world_size))
    if options.limit_batches:
        n_steps_epoch = min(n_steps_epoch, options.limit_batches)
    stage = Stage(
        name="backbone",
        step=lambda m, b, g: classify_step(m, b, g, label_smoothing=options.label_smoothing, hflip=options.hflip),
        trainable=lambda m: list(m.parameters()),
        train_data=_epoch_data(options, train),
        epochs=options.epochs, lr=options.lr, optimizer="adamw", weight_decay=options.weight_decay,
        warmup_steps=int(round(options.warmup_epochs * n_steps_epoch)), min_lr_ratio=0.01,
    )
    history = run_stages(model, [stage], val, loop, dist_info=dist_info, resume=options.resume, run_config=run_config)

    def describe():
        final = history["stages"][-1]["epochs"][-1]
        summary = {
            "command": "train-backbone", "data": options.data, "arch": options.arch, "overrides": overrides,
            "val": final.get("val"), "history": history, "options": {**dataclasses.asdict(options)},
            "session_wall_s": time.time() - t0,
        }
        return summary, {"arch": options.arch, "data": data_info_dict(options.data, info),
                         "extra": {"trained_by": "iared train-backbone",
                                   "val_top1": (final.get("val") or {}).get("top1")}}

    return finish_run(model, options.out, dist_info, describe)


def train_backbone(options: BackboneOptions) -> dict[str, Any]:
    """Train a plain ViT; write `out/model.safetensors` and `out/metrics.json` (rank 0).

    Returns:
        The metrics summary (also written to metrics.json).

    Raises:
        UserError: bad data, arch, sizes or output folder (before any training).
    """
    return run_training(_train_backbone, options)
