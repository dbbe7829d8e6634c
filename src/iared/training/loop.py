"""One training loop for every stage: backbone training, REINFORCE, fine-tuning.

The split follows DeiT's `engine.py`: `train_one_epoch` and `evaluate` each return a dict
of averaged metrics. A stage of training is a `Stage`: a *task* step function returning
{'loss', 'output', 'metrics'} (timm's `timm/task` idea), the parameters it trains, its
epochs and its optimizer settings. `run_stages` runs a list of stages one after another,
with checkpoints every N steps and at each epoch end (so at each stage boundary), and
resumes from the newest checkpoint.

Why a resumed run ends with exactly the weights of an uninterrupted one (on CPU):

* every source of randomness is a pure function of (seed, counters): the order of an
  epoch is `torch.randperm` from a generator seeded by (seed, stage, epoch), and each
  step's Bernoulli draws come from a generator seeded by (seed, rank, global step);
  cluttered data sets generate item i of epoch e from (seed, e, i);
* a checkpoint holds the model, the optimizer state, the position (stage, epoch, step),
  the running metric sums of the epoch and the global RNG states, and the learning rate
  is a pure function of the step (`cosine_lr`), so nothing else carries over;
* resuming inside an epoch skips the batches already done by slicing the epoch's index
  list, without drawing anything.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .checkpointing import ResumeError, list_checkpoints, load_latest, rng_state, save_checkpoint, set_rng_state
from .distributed import DistInfo, all_reduce_sum, average_gradients

StepFn = Callable[[nn.Module, dict[str, Any], torch.Generator], dict[str, Any]]


# -- pure pieces -------------------------------------------------------------------------

def cosine_lr(step: int, total: int, base_lr: float, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Learning rate at `step` (0-based) of `total`: linear warmup, then cosine decay.

    Args:
        step: the optimizer step about to be taken.
        total: steps in the schedule.
        base_lr: peak learning rate.
        warmup: linear-warmup steps (from base_lr / warmup to base_lr).
        min_ratio: the final learning rate as a fraction of base_lr.

    Returns:
        The learning rate.
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def epoch_indices(n: int, seed: int, stage: int, epoch: int, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True) -> list[int]:
    """This rank's item order for one epoch, like `DistributedSampler`.

    The permutation depends only on (seed, stage, epoch); it is padded by repeating its
    head to a multiple of `world_size` and dealt round-robin, so every rank gets the same
    number of items and together they cover the data set.
    """
    if shuffle:
        g = torch.Generator().manual_seed(mix_seed(seed, stage, epoch))
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    if world_size > 1:
        pad = (-n) % world_size
        order = order + order[:pad]
        order = order[rank::world_size]
    return order


def steps_per_epoch(n_items: int, batch_size: int, limit_batches: Optional[int]) -> int:
    steps = math.ceil(n_items / batch_size)
    return max(1, min(steps, limit_batches) if limit_batches else steps)


# -- options and stages ------------------------------------------------------------------

@dataclass(frozen=True)
class LoopOptions:
    """How to run stages; what to train is in each `Stage`."""

    out: str                              # run folder: checkpoints/ live here
    batch_size: int = 64                  # images per step and process
    limit_batches: Optional[int] = None   # stop each epoch after N steps (tiny runs, tests)
    workers: int = 0                      # DataLoader worker processes
    seed: int = 0                         # seeds the data order and the Bernoulli draws
    device: str = "cpu"                   # "cpu" or "cuda"
    checkpoint_every: int = 100           # steps between checkpoints (0: epoch ends only)
    val_size: Optional[int] = None        # evaluate on the first N validation items (None: all)
    val_every: int = 1                    # validate every N epochs and at the end of each stage
    eval_batch_size: int = 128            # images per evaluation batch
    progress: bool = True                 # tqdm bars (rank 0 only)


@dataclass
class Stage:
    """One stage of training (a plain record; it holds functions, so it is not frozen)."""

    name: str                                          # e.g. "backbone", "policy-1", "finetune-1"
    step: StepFn                                       # task: (model, batch, generator) -> {'loss', 'output', 'metrics'}
    trainable: Callable[[nn.Module], list[nn.Parameter]]  # the parameters this stage updates
    train_data: Callable[[int], Dataset]               # epoch -> training data of that epoch
    epochs: float                                      # length in epochs (fractions allowed)
    lr: float                                          # peak learning rate
    optimizer: str = "adam"                            # "adam", "adamw" or "sgd" (momentum 0.9)
    weight_decay: float = 0.0                          # decoupled (adamw) or L2 (adam)
    warmup_steps: int = 0                              # linear warmup before the cosine decay
    min_lr_ratio: float = 0.0                          # final lr / peak lr
    grad_clip: Optional[float] = None                  # max gradient norm (None: no clipping)
    eval_mode: Any = None                              # interpreter mode(s) for `evaluate`
    extra: dict[str, Any] = field(default_factory=dict)  # recorded with the stage's metrics


def set_trainable(model: nn.Module, params: list[nn.Parameter]) -> None:
    """Freeze everything but `params`."""
    ids = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


def make_optimizer(stage: Stage, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if stage.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    if stage.optimizer == "adam":
        return torch.optim.Adam(params, lr=stage.lr, weight_decay=stage.weight_decay)
    if stage.optimizer == "sgd":
        return torch.optim.SGD(params, lr=stage.lr, momentum=0.9, weight_decay=stage.weight_decay)
    raise ValueError(f"unknown optimizer {stage.optimizer!r}")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _loader(data: Dataset, indices: list[int], batch_size: int, workers: int) -> DataLoader:
    return DataLoader(Subset(data, indices), batch_size=batch_size, shuffle=False, num_workers=workers,
                      drop_last=False)


# -- the two engine functions ------------------------------------------------------------

def train_one_epoch(step_fn: StepFn, model: nn.Module, batches: Iterable[dict[str, Any]],
                    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], *,
                    lr_at: Callable[[int], float], first_step: int, device: torch.device,
                    generator_at: Callable[[int], torch.Generator], dist_info: DistInfo = DistInfo(),
                    grad_clip: Optional[float] = None, sums: Optional[dict[str, float]] = None,
                    on_step: Optional[Callable[[int, dict[str, float]], None]] = None,
                    progress: Optional[tqdm] = None) -> dict[str, float]:
    """Run the task over `batches`, one optimizer step each.

    Args:
        step_fn: the task; its 'metrics' are averaged weighted by batch size.
        model: the model (its trainable parameters are `params`).
        batches: the remaining batches of this epoch.
        optimizer: over `params`.
        params: the parameters whose gradients are averaged across ranks.
        lr_at: learning rate of a step index within the stage.
        first_step: stage-level index of the first batch in `batches`.
        device: where batches go.
        generator_at: the explicit generator of a stage-level step.
        dist_info: ranks; gradients and metrics are averaged over them.
        grad_clip: max gradient norm, or None.
        sums: running weighted metric sums of this epoch so far (resume), updated in place.
        on_step: called after each step with (stage step index + 1, sums) (checkpointing).
        progress: a tqdm bar to advance, or None.

    Returns:
        Metrics averaged over the whole epoch (all ranks).
    """
    model.train()
    sums = sums if sums is not None else {}
    step = first_step
    for batch in batches:
        batch = _to_device(batch, device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        out = step_fn(model, batch, generator_at(step))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        average_gradients(params, dist_info)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        n = float(batch["label"].shape[0])
        sums["_n"] = sums.get("_n", 0.0) + n
        for k, v in out["metrics"].items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        step += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix({k: f"{v:.3g}" for k, v in out["metrics"].items() if k in ("loss", "acc", "keep_greedy", "reward")})
        if on_step is not None:
            on_step(step, sums)
    return _average(sums, dist_info, device)


def _average(sums: dict[str, float], dist_info: DistInfo, device: torch.device) -> dict[str, float]:
    keys = sorted(sums)
    if not keys:
        return {}
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    all_reduce_sum(t, dist_info)
    total = dict(zip(keys, t.tolist()))
    n = max(total.pop("_n", 0.0), 1.0)
    return {k: v / n for k, v in total.items()}


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 128, device: torch.device = torch.device("cpu"),
             mode: Any = None, limit: Optional[int] = None, dist_info: DistInfo = DistInfo(),
             workers: int = 0, progress: bool = False) -> dict[str, Any]:
    """Top-1/top-5 accuracy (%), loss and keep ratios of `model` on `data` (eval mode).

    Args:
        model: a backbone, possibly patched with a policy (run with its `mode`).
        data: items {"image", "label"}.
        batch_size: evaluation batch size.
        device: where to run.
        mode: the policy's per-forward mode (IA-RED²: "greedy" at inference).
        limit: evaluate on the first `limit` items only.
        dist_info: ranks; each evaluates a shard, the sums are combined.
        workers: DataLoader workers.
        progress: show a tqdm bar.

    Returns:
        {"top1", "top5", "loss", "n", "keep_ratio", "keep_ratio_per_group"}; keep ratios
        are fractions of the full patch grid alive after each policy stage.
    """
    model.eval()
    n_items = len(data) if limit is None else min(limit, len(data))
    indices = list(range(n_items))[dist_info.rank::dist_info.world_size]
    loader = _loader(data, indices, batch_size, workers)
    sums: Optional[torch.Tensor] = None
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False, file=sys.stderr):
        batch = _to_device(batch, device)
        logits, info = model(batch["image"], return_info=True, mode=mode)
        labels = batch["label"]
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        keep = [s.keep_ratio.sum() for s in info.stages]
        row = torch.stack([
            (top5[:, 0] == labels).sum().double(),
            (top5 == labels[:, None]).any(dim=-1).sum().double(),
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
            torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=logits.device),
            *[k.double() for k in keep],
        ])
        sums = row if sums is None else sums + row
    if sums is None:  # this rank had no items; still take part in the reduction
        n_stages = len(getattr(model.policy, "interpreters", [])) if getattr(model, "policy", None) is not None else 0
        sums = torch.zeros(4 + n_stages, dtype=torch.float64, device=device)
    all_reduce_sum(sums, dist_info)
    s = sums.tolist()
    n = max(s[3], 1.0)
    per_group = [v / n for v in s[4:]]
    return {"top1": 100 * s[0] / n, "top5": 100 * s[1] / n, "loss": s[2] / n, "n": int(s[3]),
            "keep_ratio": per_group[-1] if per_group else 1.0, "keep_ratio_per_group": per_group}


# -- stages, checkpoints and resuming ----------------------------------------------------

def run_stages(model: nn.Module, stages: list[Stage], val_data: Optional[Dataset], options: LoopOptions, *,
               dist_info: DistInfo = DistInfo(), resume: bool = False, run_config: Optional[dict[str, Any]] = None,
               log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Train `model` through `stages`, checkpointing in `options.out`, optionally resuming.

    Args:
        model: the model, on `options.device` already.
        stages: what to train, in order.
        val_data: evaluated after each epoch (None: skip).
        options: loop settings.
        dist_info: ranks (only rank 0 writes).
        resume: continue from the newest checkpoint in `options.out` (none: start fresh).
        run_config: JSON-able settings that must match on resume (a resumed run with
            other settings would not reproduce the original).
        log: where one-line progress messages go.

    Returns:
        {"stages": [{"name", "epochs": [{"train": {...}, "val": {...}}, ...]}, ...]}.

    Raises:
        ResumeError: damaged checkpoint, or settings differing from the checkpoint's.
    """
    device = torch.device(options.device if options.device != "cuda" else f"cuda:{dist_info.local_rank}")
    run_config = run_config or {}
    say = log if dist_info.is_main else (lambda line: None)  # one line per run, not one per rank
    state, pos, history = _restore_or_start(model, len(stages), options, dist_info, resume, run_config, say)
    run = _Run(model, val_data, options, dist_info, run_config, device, history, log)
    for si in range(pos["stage"], len(stages)):
        resuming_here = state is not None and si == pos["stage"]
        total = _run_stage(run, si, stages[si], state if resuming_here else None, pos)
        state = None  # later stages start fresh
        pos = {"stage": si + 1, "epoch": 0, "step": 0, "global_step": _global_step(history, total, si)}
    return _public_history(history)


@dataclass
class _Run:
    """What every stage and epoch of one `run_stages` call shares."""

    model: nn.Module
    val_data: Optional[Dataset]
    options: LoopOptions
    dist_info: DistInfo
    run_config: dict[str, Any]
    device: torch.device
    history: dict[str, Any]                # updated in place: the epochs' records, saved in checkpoints
    log: Callable[[str], None]


def _restore_or_start(model: nn.Module, n_stages: int, options: LoopOptions, dist_info: DistInfo, resume: bool,
                      run_config: dict[str, Any],
                      say: Callable[[str], None]) -> tuple[Optional[dict[str, Any]], dict[str, int], dict[str, Any]]:
    """Restore the newest checkpoint (with `resume`), or start fresh.

    Restoring loads the model and the global RNG states; starting fresh without `resume`
    removes the checkpoints an earlier run left in `options.out`.

    Returns:
        The checkpoint's state (None: fresh start), the position to continue from
        {"stage", "epoch", "step", "global_step"}, and the history so far.

    Raises:
        ResumeError: damaged checkpoint, or settings differing from the checkpoint's.
    """
    state = load_latest(options.out) if resume else None
    if state is None:
        stale = list_checkpoints(options.out) if not resume and dist_info.is_main else []
        if stale:
            # Starting over: remove the earlier run's checkpoints, or a later --resume would continue theirs.
            say(f"{options.out} held {len(stale)} checkpoint(s) of an earlier run: removed, starting over "
                f"(--resume continues a run)")
            for path in stale:
                path.unlink(missing_ok=True)
        return None, {"stage": 0, "epoch": 0, "step": 0, "global_step": 0}, {"stages": []}
    _check_config(state.get("run_config", {}), run_config)
    model.load_state_dict(state["model"])
    set_rng_state(state["rng"])
    pos = dict(state["position"])
    if pos["stage"] >= n_stages:
        say(f"the run in {options.out} is complete: nothing left to train (outputs written again)")
    else:
        say(f"resuming at stage {pos['stage'] + 1}/{n_stages}, epoch {pos['epoch']}, step {pos['step']}")
    return state, pos, state["history"]


def _run_stage(run: _Run, si: int, stage: Stage, state: Optional[dict[str, Any]], pos: dict[str, int]) -> int:
    """Train one stage from its start, or from `pos` when resuming inside it.

    Args:
        run: the shared run.
        si: the stage's index.
        stage: the stage.
        state: the checkpoint resumed inside this stage (optimizer, epoch sums), or None.
        pos: the position to continue from (read only with `state`).

    Returns:
        The stage's length in optimizer steps.
    """
    options, dist_info = run.options, run.dist_info
    params = stage.trainable(run.model)
    set_trainable(run.model, params)
    optimizer = make_optimizer(stage, params)
    if state is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if len(run.history["stages"]) <= si:
        run.history["stages"].append({"name": stage.name, "extra": dict(stage.extra), "epochs": []})

    first_data = stage.train_data(0)
    n_shard = len(epoch_indices(len(first_data), options.seed, si, 0, dist_info.rank, dist_info.world_size,
                                shuffle=False))
    spe = steps_per_epoch(n_shard, options.batch_size, options.limit_batches)
    total = max(1, round(stage.epochs * spe))
    start_epoch, start_step = (pos["epoch"], pos["step"]) if state is not None else (0, 0)
    bar = tqdm(total=total, initial=min(total, start_epoch * spe + start_step),
               desc=stage.name, disable=not (options.progress and dist_info.is_main), file=sys.stderr,
               mininterval=2.0, dynamic_ncols=True)
    for epoch in range(start_epoch, math.ceil(total / spe)):
        first = start_step if epoch == start_epoch else 0
        sums = dict(state["epoch_sums"]) if (state is not None and epoch == start_epoch and first > 0) else {}
        _run_epoch(run, si, stage, epoch, first_data if epoch == 0 else stage.train_data(epoch), optimizer,
                   params, spe=spe, total=total, first=first, sums=sums, bar=bar)
    bar.close()
    return total


def _run_epoch(run: _Run, si: int, stage: Stage, epoch: int, data: Dataset, optimizer: torch.optim.Optimizer,
               params: list[nn.Parameter], *, spe: int, total: int, first: int, sums: dict[str, float],
               bar: tqdm) -> None:
    """Train one epoch (from step `first`), validate, log, and checkpoint its end.

    Args:
        run: the shared run.
        si: the stage's index.
        stage: the stage.
        epoch: the epoch's index within the stage.
        data: the epoch's training data.
        optimizer: over `params`.
        params: the parameters the stage trains.
        spe: steps per epoch.
        total: the stage's length in steps.
        first: steps of this epoch already done (resume), skipped.
        sums: the epoch's running metric sums so far (resume), updated in place.
        bar: the stage's progress bar.
    """
    options, dist_info, history = run.options, run.dist_info, run.history
    n_epochs = math.ceil(total / spe)
    order = epoch_indices(len(data), options.seed, si, epoch, dist_info.rank, dist_info.world_size)
    steps = min(spe, total - epoch * spe)
    loader = _loader(data, order[first * options.batch_size: steps * options.batch_size],
                     options.batch_size, options.workers)
    base = epoch * spe  # stage-level index of this epoch's first step
    t_epoch = time.time()

    def on_step(done_in_stage: int, sums: dict[str, float]) -> None:
        pos_now = {"stage": si, "epoch": epoch, "step": done_in_stage - base,
                   "global_step": _global_step(history, done_in_stage, si)}
        if options.checkpoint_every and pos_now["global_step"] % options.checkpoint_every == 0:
            _save(run.model, optimizer, pos_now, history, sums, run.run_config, options, dist_info)

    train_metrics = train_one_epoch(
        stage.step, run.model, loader, optimizer, params,
        lr_at=lambda s: cosine_lr(s, total, stage.lr, stage.warmup_steps, stage.min_lr_ratio),
        first_step=base + first, device=run.device,
        generator_at=lambda s: torch.Generator().manual_seed(mix_seed(options.seed, 7919, dist_info.rank, si, s)),
        dist_info=dist_info, grad_clip=stage.grad_clip, sums=sums, on_step=on_step, progress=bar)
    record: dict[str, Any] = {"epoch": epoch, "steps": steps, "train": train_metrics,
                              "train_wall_s": time.time() - t_epoch}
    last = epoch == n_epochs - 1
    if run.val_data is not None and (last or (epoch + 1) % options.val_every == 0):
        record["val"] = evaluate(run.model, run.val_data, batch_size=options.eval_batch_size, device=run.device,
                                 mode=stage.eval_mode, limit=options.val_size, dist_info=dist_info,
                                 workers=options.workers, progress=options.progress and dist_info.is_main)
    history["stages"][si]["epochs"].append(record)
    if dist_info.is_main:
        run.log(_epoch_line(stage.name, epoch, n_epochs, record))
    nxt = ({"stage": si + 1, "epoch": 0, "step": 0} if last else {"stage": si, "epoch": epoch + 1, "step": 0})
    nxt["global_step"] = _global_step(history, base + steps, si)
    _save(run.model, None if last else optimizer, nxt, history, {}, run.run_config, options, dist_info)


def _epoch_line(name: str, epoch: int, n_epochs: int, record: dict[str, Any]) -> str:
    """The log line of one epoch: its training metrics and, if validated, top-1 and keep ratios."""
    val = record.get("val", {})
    return (f"[{name}] epoch {epoch + 1}/{n_epochs} train " +
            " ".join(f"{k}={v:.4g}" for k, v in record["train"].items()) +
            (f" | val top1={val['top1']:.2f} keep={['%.3f' % k for k in val['keep_ratio_per_group']]}"
             if val else ""))


def _stage_offset(history: dict[str, Any], si: int) -> int:
    """Global step at which stage `si` started (steps of all earlier stages)."""
    return sum(sum(e["steps"] for e in st["epochs"]) for st in history["stages"][:si])


def _global_step(history: dict[str, Any], done_in_stage: int, si: int) -> int:
    return _stage_offset(history, si) + done_in_stage


def _save(model, optimizer, position, history, sums, run_config, options: LoopOptions, dist_info: DistInfo) -> None:
    if not dist_info.is_main:
        return
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "position": position,
        "history": history,
        "epoch_sums": dict(sums),
        "rng": rng_state(),
        "run_config": run_config,
    }
    save_checkpoint(state, options.out, position["global_step"])


def _check_config(saved: dict[str, Any], now: dict[str, Any]) -> None:
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise ResumeError(f"--resume with different settings than the checkpoint: {k} was {saved.get(k)!r}, "
                          f"now {now.get(k)!r} ({len(diff)} setting(s) differ)")


def _public_history(history: dict[str, Any]) -> dict[str, Any]:
    return {"stages": [{k: v for k, v in st.items() if not k.startswith("_")} for st in history["stages"]]}
