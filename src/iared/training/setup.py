"""Input checks shared by the training commands: each bad input fails before any training."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..errors import UserError
from ..fileio import check_writable, write_json
from ..models import save_model
from .distributed import DistInfo, barrier
from .loop import LoopOptions


def load_data(spec: str, split: str, seed: int = 0, **kw: Any) -> Dataset:
    """`build_dataset`, with data problems turned into `UserError` and empty data refused."""
    from ..data import DataError, build_dataset

    try:
        ds = build_dataset(spec, split, seed=seed, **kw)
    except DataError as e:
        raise UserError(str(e)) from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load data {spec!r} ({split}): {e}") from None
    if len(ds) == 0:
        raise UserError(f"data {spec!r} has no {split} items")
    return ds


def check_output_dir(out: Path) -> None:
    """Create `out` and prove it is writable (a probe file), or raise `UserError`."""
    try:
        check_writable(out)
    except OSError as e:
        raise UserError(f"output folder {out} is not writable: {e.strerror or e}") from None


def finish_run(model: nn.Module, out: str, dist_info: DistInfo,
               describe: Callable[[], tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """End a training run: on rank 0, `describe()` gives (summary, `save_model`'s keyword
    arguments) and writes `out/model.safetensors` and `out/metrics.json`; every rank waits
    for that and returns the summary (empty off rank 0)."""
    summary: dict[str, Any] = {}
    if dist_info.is_main:
        summary, model_meta = describe()
        save_model(model.cpu(), Path(out) / "model.safetensors", **model_meta)
        write_json(Path(out) / "metrics.json", summary)
    barrier(dist_info)
    return summary


def data_info_dict(spec: str, info: Any) -> dict[str, Any]:
    """The data config stored in a model file: the spec plus the `DataInfo` fields."""
    d = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(info)
    return {"spec": spec, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}






class Relabelled(Dataset):
    """`data` with its labels replaced (its `info` kept)."""

    def __init__(self, data: Dataset, labels: torch.Tensor, info: Any = None):
        self.data, self.labels = data, labels
        self.info = info if info is not None else getattr(data, "info", None)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.data[i], "label": self.labels[i]}


@torch.no_grad()
def relabel(data: Dataset, teacher: nn.Module, *, limit: Optional[int] = None, batch_size: int = 128,
            device: Any = "cpu", progress: bool = False) -> Relabelled:
    """The first `limit` items of `data` (all: None) labelled by `teacher`'s predictions
    (argmax), computed once."""
    info = getattr(data, "info", None)
    if limit is not None and limit < len(data):
        data = Subset(data, range(limit))
    teacher.eval()
    preds = [teacher(b["image"].to(device)).argmax(-1).cpu()
             for b in tqdm(DataLoader(data, batch_size=batch_size), desc="teacher labels",
                           disable=not progress, leave=False)]
    return Relabelled(data, torch.cat(preds), info)


def with_teacher_labels(teacher: nn.Module) -> Callable:
    """Wrap a training step so that each batch's labels are `teacher`'s predictions."""
    def wrap(step: Callable) -> Callable:
        def run(model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
            with torch.no_grad():
                labels = teacher(batch["image"]).argmax(-1)
            return step(model, {**batch, "label": labels}, generator)
        return run
    return wrap


# Settings that may change between a run and its resumption (where and how it runs, not what).
_NOT_RUN_CONFIG = ("out", "resume", "workers", "progress", "device", "val_size", "val_every", "checkpoint_every")


def loop_settings(options: Any, world_size: int) -> tuple[LoopOptions, dict[str, Any]]:
    """The `LoopOptions` a training command's options carry, and the run config a resume
    must match (its options without `_NOT_RUN_CONFIG`, tuples as lists, the world size)."""
    loop = LoopOptions(out=options.out, batch_size=options.batch_size, limit_batches=options.limit_batches,
                       workers=options.workers, seed=options.seed, device=options.device,
                       checkpoint_every=options.checkpoint_every, val_size=options.val_size,
                       val_every=options.val_every, progress=options.progress)
    run_config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()
                  if k not in _NOT_RUN_CONFIG}
    run_config["world_size"] = world_size
    return loop, run_config
