"""Input checks shared by the training commands: each bad input fails before any training."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..errors import UserError
from ..fileio import atomic_write_json, check_writable


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


def data_info_dict(spec: str, info: Any) -> dict[str, Any]:
    """The data config stored in a model file: the spec plus the `DataInfo` fields."""
    d = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(info)
    return {"spec": spec, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (see `iared.fileio`)."""
    atomic_write_json(path, obj, default=str, indent=2)


