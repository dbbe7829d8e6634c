"""IA-RED² training (Algorithm 1): interpreters by REINFORCE, group by group, with fine-tuning.

For j = 1..D:

1. *policy-j*: train interpreter j by REINFORCE (`reinforce_step`) for E_p epochs;
   interpreters 1..j-1 act greedily, j+1..D keep every token, and every other parameter
   is frozen;
2. *finetune-j* (optional, `finetune=True`): freeze interpreter j and fine-tune the
   MSA-FFN blocks of groups j..D with cross-entropy (`finetune_step`) for E_b epochs.

Frozen throughout (the paper): patch embedding, position embedding, class token.
Decision: the final LayerNorm and the classifier head are fine-tuned together with the
blocks of groups j..D (they read only the last group's output, which the fine-tuning
changes; freezing them would make the last blocks chase a fixed readout). They never
change in the REINFORCE stages, and with `finetune=False` the backbone is untouched.

Beyond the paper, `target="agreement"` reads Eq. 2's "correct" as "the reduced model
predicts what the unreduced backbone predicts", so interpreters can be fitted on
unlabeled images: the labels of each batch are replaced by a frozen copy of the backbone's
argmax (fine-tuning then distills the blocks towards the original model), and validation
measures that agreement too.

E_p : E_b = 10 : 20 per group in the paper; `epochs` is the budget per group, split by
`schedule`. Without fine-tuning only the E_p part runs (the paper's Table 2/3 setting).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from ..backbones.checkpoint import CheckpointError, load_pretrained, read_checkpoint, read_metadata
from ..backbones.registry import list_models
from ..errors import UserError
from ..models import check_data_fits, load_model_file, read_model_meta
from ..patch import patch
from ..reduction.interpreter import IARedPolicy
from .backbone import build_backbone
from .distributed import DistInfo, agree, broadcast_parameters, device_for, run_training
from .finetune import finetune_step
from .loop import Stage, evaluate, run_stages
from .reinforce import group_modes, reinforce_step
from .setup import check_output_dir, data_info_dict, finish_run, load_data, loop_settings, relabel, with_teacher_labels


TARGETS = ("label", "agreement")


@dataclass(frozen=True)
class TrainOptions:
    """Everything `train_iared` needs; the CLI fills it in."""

    data: str                              # data spec KIND[:PATH]
    checkpoint: str                        # backbone: an iared model file, or a state dict with `arch`
    out: str                               # run folder: model.safetensors, metrics.json, checkpoints/
    groups: int = 3                        # D: groups of blocks, one interpreter each
    arch: Optional[str] = None             # registry name; needed for plain state dicts, checked otherwise
    epochs: float = 30.0                   # budget per group, split policy:finetune by `schedule`
    schedule: tuple[float, float] = (10.0, 20.0)  # E_p : E_b, the paper's 10 : 20
    finetune: bool = True                  # run the fine-tuning stages (paper's Tables 2/3: without)
    tau: float = 1.0                       # Eq. 2 penalty of a wrong prediction (higher: keep more)
    target: str = "label"                  # Eq. 2's "correct": matches the label, or ("agreement") the
                                           # unreduced backbone's prediction: no labels needed
    lr: float = 4e-5                       # peak learning rate of the interpreters (paper: 4e-5)
    finetune_lr: Optional[float] = None    # peak learning rate of the blocks (None: `lr`)
    optimizer: str = "adam"                # "adam" (the paper's images) or "sgd" (its video runs, momentum 0.9)
    batch_size: int = 64                   # images per step and process (paper: 32 per GPU)
    label_smoothing: float = 0.0           # cross-entropy label smoothing when fine-tuning
    limit_batches: Optional[int] = None    # stop each epoch after N steps (tiny runs, tests)
    val_size: Optional[int] = None         # validate on the first N validation items (None: all)
    val_every: int = 1                     # validate every N epochs (and at the end of each stage)
    checkpoint_every: int = 100            # steps between checkpoints
    workers: int = 0                       # DataLoader worker processes
    seed: int = 0                          # data order, Bernoulli draws, interpreter initialisation
    device: str = "cpu"                    # "cpu" or "cuda"
    resume: bool = False                   # continue the run in `out`
    progress: bool = True                  # tqdm progress bars

    def check(self) -> None:
        """Raise `UserError` on a setting no run can use (before any process starts)."""
        if self.groups < 1:
            raise UserError("--groups must be at least 1")
        if len(self.schedule) != 2 or min(self.schedule) < 0 or sum(self.schedule) <= 0:
            raise UserError("--schedule must be two non-negative numbers E_p:E_b, not both zero")
        if self.target not in TARGETS:
            raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.epochs <= 0 or self.policy_epochs <= 0:
            raise UserError("--epochs and the policy part of --schedule must be positive")

    @property
    def policy_epochs(self) -> float:
        return self.epochs * self.schedule[0] / sum(self.schedule)

    @property
    def finetune_epochs(self) -> float:
        return self.epochs * self.schedule[1] / sum(self.schedule)


def load_backbone(path: str, arch: Optional[str], data: str, split_seed: int = 0
                  ) -> tuple[nn.Module, str, Optional[dict[str, Any]], Dataset, Dataset]:
    """The backbone to train interpreters on and its train/val data, checked against each other.

    Args:
        path: an iared model file, a timm-layout `.safetensors` file naming its
            `architecture`, or a state dict (then `arch` is needed).
        arch: registry name; required for a bare state dict, must agree with a model file.
        data: the data spec; a model file's preprocessing (`model.pretrained_cfg`) is
            applied to it, so a pretrained ImageNet model sees its own eval transform.
        split_seed: seed of a carved train/val partition.

    Returns:
        (model on CPU, its registry name, the data config stored in the model file or
        None, train data, val data).

    Raises:
        UserError: missing/damaged file, arch mismatch, or a model that does not fit the data.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"backbone checkpoint not found: {p}")
    meta = read_metadata(p) if p.suffix == ".safetensors" else {}
    if "iared" in meta or "architecture" in meta:
        if "iared" in meta:
            own = read_model_meta(p)
            if arch is not None and arch != own["arch"]:
                raise UserError(f"--arch {arch} does not match the backbone file, which holds a {own['arch']}")
            if own.get("policy"):
                raise UserError(f"{p} already has a {own['policy'].get('name')} policy: pass a plain backbone")
        model = load_model_file(p, None if "iared" in meta else arch)
        arch = model.model_meta["arch"]
        data_meta = model.model_meta.get("data")
        train, val = (load_data(data, s, split_seed, preprocess=model.pretrained_cfg) for s in ("train", "val"))
        check_data_fits(train.info, model, data)
        return model, arch, data_meta, train, val
    # A bare state dict: the backbone is built to the data's shape (classes, channels, size).
    read_checkpoint(p)  # a damaged or unsafe file is reported as such, before asking for --arch
    if arch is None:
        raise UserError(f"{p} is a plain state dict: pass --arch to say which model it holds")
    if arch not in list_models():
        raise UserError(f"unknown --arch {arch!r}; available: {', '.join(list_models())}")
    train, val = (load_data(data, s, split_seed) for s in ("train", "val"))
    model, _ = build_backbone(arch, train.info)
    try:
        load_pretrained(model, p)
    except CheckpointError as e:
        raise UserError(f"backbone {p} does not match --arch {arch}: {e}") from None
    check_data_fits(train.info, model, data)
    return model, arch, None, train, val


def group_blocks(model: nn.Module, group: int, groups: int) -> list[nn.Module]:
    """The MSA-FFN blocks of groups `group`..D-1 (0-based)."""
    per = len(model.blocks) // groups
    return list(model.blocks[group * per:])


def build_stages(model: nn.Module, train: Dataset, options: TrainOptions,
                 teacher: Optional[nn.Module] = None) -> list[Stage]:
    """Algorithm 1 as a list of stages: policy-1, finetune-1, policy-2, ...

    With a `teacher` (`target="agreement"`), every step's labels are its predictions.
    """
    D = options.groups
    stages: list[Stage] = []
    on_labels = with_teacher_labels(teacher) if teacher is not None else (lambda step: step)

    def data_for(offset: int):
        def fn(epoch: int) -> Dataset:
            if hasattr(train, "set_epoch"):
                train.set_epoch(offset + epoch)  # fresh clutter in every epoch of every stage
            return train
        return fn

    for j in range(D):
        eval_mode = group_modes(j, D, "greedy")
        stages.append(Stage(
            name=f"policy-{j + 1}",
            step=on_labels(lambda m, b, g, _j=j: reinforce_step(m, b, group=_j, groups=D, tau=options.tau,
                                                                generator=g)),
            trainable=lambda m, _j=j: list(m.policy.interpreters[_j].parameters()),
            train_data=data_for(len(stages) * 1000), epochs=options.policy_epochs, lr=options.lr,
            optimizer=options.optimizer, eval_mode=eval_mode, extra={"group": j + 1, "kind": "policy", "tau": options.tau},
        ))
        if options.finetune and options.finetune_epochs > 0:
            stages.append(Stage(
                name=f"finetune-{j + 1}",
                step=on_labels(lambda m, b, g, _j=j: finetune_step(m, b, group=_j, groups=D,
                                                                   label_smoothing=options.label_smoothing)),
                trainable=lambda m, _j=j: [p for blk in group_blocks(m, _j, D) for p in blk.parameters()]
                + list(m.norm.parameters()) + list(m.head.parameters()),
                train_data=data_for(len(stages) * 1000), epochs=options.finetune_epochs,
                lr=options.finetune_lr if options.finetune_lr is not None else options.lr,
                optimizer=options.optimizer, eval_mode=eval_mode, extra={"group": j + 1, "kind": "finetune"},
            ))
    return stages


def _train_iared(options: TrainOptions, dist_info: DistInfo) -> dict[str, Any]:
    t0 = time.time()

    def prepare():
        model, arch, data_meta, train, val = load_backbone(options.checkpoint, options.arch, options.data,
                                                           options.seed)
        if train.info.num_classes == 0 and options.target == "label":
            raise UserError(f"data {options.data!r} has no labels: train with --target agreement")
        depth = model.config.depth
        if depth % options.groups:
            raise UserError(f"--groups {options.groups} does not divide the backbone's depth {depth}")
        if dist_info.is_main:
            check_output_dir(Path(options.out))
        return train, val, model, arch, data_meta

    train, val, model, arch, data_meta = agree(dist_info, prepare)
    device = device_for(options.device, dist_info)
    teacher = None
    if options.target == "agreement":
        teacher = copy.deepcopy(model).eval().requires_grad_(False).to(device)
        val = relabel(val, teacher, limit=options.val_size, batch_size=2 * options.batch_size, device=device,
                      progress=options.progress and dist_info.is_main)
    torch.manual_seed(options.seed)  # interpreter initialisation
    patch(model, IARedPolicy.for_model(model, groups=options.groups))  # to be trained: no warning
    model.to(device)
    broadcast_parameters(model, dist_info)

    loop, run_config = loop_settings(options, dist_info.world_size)
    before = evaluate(model, val, batch_size=loop.eval_batch_size, device=device, mode="all", limit=options.val_size,
                      dist_info=dist_info, workers=options.workers)
    stages = build_stages(model, train, options, teacher)
    history = run_stages(model, stages, val, loop, dist_info=dist_info, resume=options.resume, run_config=run_config)

    def describe():
        per_stage = [{"stage": st["name"], **st["extra"], "val_top1": st["epochs"][-1]["val"]["top1"],
                      "keep_ratio_per_group": st["epochs"][-1]["val"]["keep_ratio_per_group"]}
                     for st in history["stages"]]
        final = history["stages"][-1]["epochs"][-1]["val"]
        summary = {
            "command": "train", "data": options.data, "checkpoint": options.checkpoint, "arch": arch,
            "groups": options.groups, "backbone_val": before, "val": final, "per_stage": per_stage,
            "history": history, "options": dataclasses.asdict(options), "session_wall_s": time.time() - t0,
        }
        return summary, {"arch": arch, "data": data_meta or data_info_dict(options.data, train.info),
                         "extra": {"trained_by": "iared train", "val_top1": final["top1"],
                                   "keep_ratio_per_group": final["keep_ratio_per_group"]}}

    return finish_run(model, options.out, dist_info, describe)


def train_iared(options: TrainOptions) -> dict[str, Any]:
    """Run Algorithm 1; write `out/model.safetensors` and `out/metrics.json` (rank 0).

    Returns:
        The summary written to metrics.json: per-stage validation accuracy and keep
        ratio per group, and the backbone's accuracy before training.

    Raises:
        UserError: bad data, backbone, groups or output folder (before any training).
    """
    return run_training(_train_iared, options)
