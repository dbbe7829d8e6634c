"""Resumable training state: atomic writes, the last two kept, `weights_only=True` loads.

A training checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no
Python objects), so `torch.load(weights_only=True)` reads it and it can never run code.
RNG states are stored as tensors (numpy's and Python's converted), and our own explicit
generators (data order, Bernoulli draws) are re-derived from the seed and the counters,
so the counters alone fix them.

Files are `DIR/checkpoints/step-XXXXXXXX.pt`. Each is written to a temporary name, synced
and renamed, so a run killed at any moment (SIGKILL included) leaves either the previous
file set or the new one, never a half-written file under a final name. The newest two are
kept: if the newest is damaged anyway (disk trouble, a user's copy), the error says so and
the previous good one is still there.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import UserError

FORMAT = "iared-train-state/1"
_NAME = re.compile(r"^step-(\d{8})\.pt$")
KEEP_LAST = 2


class ResumeError(UserError):
    """A checkpoint that cannot be resumed from (missing, damaged, another run's)."""


def checkpoint_dir(out: os.PathLike | str) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: os.PathLike | str) -> list[Path]:
    """Complete checkpoint files in `out`, oldest first (temporary files are ignored)."""
    d = checkpoint_dir(out)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def save_checkpoint(state: dict[str, Any], out: os.PathLike | str, step: int) -> Path:
    """Write `state` atomically as `step-<step>.pt` and delete all but the newest two.

    Args:
        state: plain containers of tensors/numbers/strings (see module docstring).
        out: the run's output folder.
        step: global step counter, which orders the files.

    Returns:
        The path written.
    """
    d = checkpoint_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step-{step:08d}.pt"
    tmp = d / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)   # a full disk or an unpicklable state leaves nothing behind
        raise
    _fsync_dir(d)
    for old in list_checkpoints(out)[:-KEEP_LAST]:
        old.unlink(missing_ok=True)
    # Temporary files of a run killed while writing (one writer per folder: rank 0).
    for stale in d.glob(".step-*.pt.*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: os.PathLike | str) -> dict[str, Any]:
    """Read one checkpoint with `weights_only=True`.

    Raises:
        ResumeError: unreadable, truncated, or not a training checkpoint.
    """
    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ResumeError(f"checkpoint {path} is damaged or incomplete ({msg})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeError(f"{path} is not an iared training checkpoint")
    return state


def load_latest(out: os.PathLike | str) -> Optional[dict[str, Any]]:
    """The newest checkpoint in `out`, or None when there is none.

    Raises:
        ResumeError: when the newest file is damaged; the message names the previous
            good one (which is kept) so the user can remove the damaged file and resume.
    """
    files = list_checkpoints(out)
    if not files:
        return None
    try:
        return load_checkpoint(files[-1])
    except ResumeError as e:
        prev = f"; the previous checkpoint {files[-2]} is intact: delete the damaged file and resume again" \
            if len(files) > 1 else ""
        raise ResumeError(f"{e}{prev}") from None


# -- RNG states as tensors ---------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and numbers."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python_version": int(py_state[0]),
        "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": py_state[2] if py_state[2] is None else float(py_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
