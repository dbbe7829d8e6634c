"""The few collective operations training needs, as no-ops in a single process.

Under `torchrun --nproc_per_node=N` every process trains on its own shard of each epoch
(see `loop.epoch_indices`), gradients are averaged with one all-reduce per step, and
only rank 0 writes files. Averaging gradients by hand rather than wrapping the model in
DDP keeps one code path for every stage: which parameters train changes from stage to
stage of the curriculum, which DDP would need re-wrapping (and `find_unused_parameters`)
for. With identical starting weights and identical averaged gradients every rank takes
the same optimizer step, so all ranks hold the same weights throughout.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ErrorOnOtherRank, UserError, report

T = TypeVar("T")
OptionsT = TypeVar("OptionsT")  # an options dataclass with `check()` and `device`


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0          # this process's index
    world_size: int = 1    # number of processes
    local_rank: int = 0    # index on this machine (picks the GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def device_for(device: str, info: DistInfo) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}") if device == "cuda" else torch.device("cpu")


def average_gradients(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """Replace each gradient by its mean over ranks (a missing gradient counts as zero)."""
    if not info.enabled:
        return
    params = list(params)
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    """Sum of `t` over ranks (in place; returned for convenience)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_parameters(model: nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's weights."""
    if not info.enabled:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str) -> Iterator[DistInfo]:
    """`init_distributed` on entry, `cleanup` on exit (also when training raises; a barrier
    first when it did not)."""
    info = init_distributed(device)
    try:
        yield info
        barrier(info)  # ranks that finished leave together: gloo can abort a rank whose peer tore down first
    finally:
        cleanup(info)


def run_training(train: Callable[[OptionsT, DistInfo], T], options: OptionsT) -> T:
    """`options.check()` (a bad setting fails before any process group exists), then
    `train(options, dist_info)` inside `distributed(options.device)`."""
    options.check()  # type: ignore[attr-defined]
    with distributed(options.device) as info:  # type: ignore[attr-defined]
        return train(options, info)


def agree(info: DistInfo, fn: Callable[[], T]) -> T:
    """Run the checks and set-up `fn` on every rank, then agree on the verdict.

    If `fn` raises a `UserError` on any rank, every rank raises one: rank 0 with the
    first failing rank's message (the CLI prints it once), the others an
    `ErrorOnOtherRank` the CLI does not print. So no rank is left waiting in a collective
    call for a rank that gave up, and a user error under torchrun is one line, exit 2.
    Any other exception (a bug) is re-raised where it happened, and the other ranks
    raise a `RuntimeError` naming that rank instead of waiting for it.
    """
    error: Optional[UserError] = None
    crash: Optional[Exception] = None
    try:
        result = fn()
    except UserError as e:
        error = e
    except Exception as e:  # noqa: BLE001 -- re-raised below, after telling the other ranks
        crash = e
    if info.enabled:
        verdicts: list = [None] * info.world_size
        mine = ("user", str(error)) if error is not None else ("crash", repr(crash)) if crash is not None else None
        dist.all_gather_object(verdicts, mine)
        if crash is not None:
            raise crash
        crashed = next(((rank, v[1]) for rank, v in enumerate(verdicts) if v and v[0] == "crash"), None)
        if crashed is not None:
            raise RuntimeError(f"rank {crashed[0]} failed while setting up: {crashed[1]}")
        first = next((v[1] for v in verdicts if v), None)
        if first is not None:
            err = UserError(first) if info.is_main else ErrorOnOtherRank(first)
            if info.is_main:
                report(first)
                err.reported = True
            # No rank exits (and has torchrun stop the others) before rank 0 has said why.
            dist.barrier()
            raise err
    if error is not None:
        raise error
    if crash is not None:
        raise crash
    return result
