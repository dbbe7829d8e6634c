"""Writing files so that nothing is ever half-written.

Every output iared writes (JSON results, reports, figures, model files) goes through a
temporary file in the destination folder and one `os.replace`, so a reader or a crash
sees either the old file or the new one. Temporary files from `mkstemp` are created with
mode 0600; results are ordinary files, so they get the usual permissions (0666 & ~umask).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write `data` (bytes or text) to `path` atomically; create the folder if needed."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: PathLike, obj: Any, default: Optional[Callable[[Any], Any]] = None,
                      indent: int = 1) -> Path:
    """Write `obj` as JSON (one trailing newline) to `path` atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent, default=default) + "\n")


def write_json(path: PathLike, obj: Any) -> Path:
    """Write `obj` as a result file: JSON, atomically; tensors and arrays as lists, anything
    else JSON lacks (paths, dtypes) as its string."""
    return atomic_write_json(path, obj, default=_jsonable)


def _jsonable(o: Any) -> Any:
    tolist = getattr(o, "tolist", None)  # torch tensors, numpy arrays and scalars
    return tolist() if callable(tolist) else str(o)


def check_writable(path: PathLike, is_file: bool = False) -> Path:
    """Create the folder `path` (or, with `is_file`, the folder of the file `path`) and
    prove it takes new files, before any long work whose output would be lost.

    Raises:
        OSError: the folder cannot be created or written, or the file path is a folder.
    """
    path = Path(path)
    if is_file and path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
    folder = path.parent if is_file else path
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    os.close(fd)
    os.unlink(probe)
    return path
