"""The C++ block (`csrc/block.cpp`): a ViT block's inference forward in one call.

Why. At batch 1 a narrow block pays a fixed cost per Python-level operation whatever its
token count (docs/performance.md, "The batch-1 floor"); running the block's dozen ATen ops
from C++ removes it, with the same oneDNN kernels and so the same values as the Python
path. `cpu_kernels` uses it for every eligible block when `kernels` is "native" (or
"auto" where it builds), and for the blocks of ATS, EViT and ToMe and IA-RED²'s policy stages (registered by
those modules in `iared.reduction`).

Built with `torch.utils.cpp_extension.load` the first time it is asked for (about a minute,
needs a C++17 compiler and ninja; `make install` builds it up front) and cached by torch
under `$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`), rebuilt only when the
source or torch changes. Where it cannot be built, `native_module()` returns None, says why
once, and the pure-PyTorch path runs instead: nothing else depends on it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

SOURCE = Path(__file__).with_name("csrc") / "block.cpp"
NAME = "iared_native"  # the module's name stem, and its build folder's under the extensions directory
DISABLE = "IARED_NATIVE"  # set to 0 to never build or use the extension


def _ninja_on_path() -> None:
    """Put the `ninja` package's binary on PATH: torch's builder runs `ninja` from PATH, and a
    virtual environment's is not there unless it was activated."""
    try:
        import ninja
    except ImportError:
        return  # a system ninja, if any, is used
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


def _build_name() -> str:
    """NAME plus a digest of the torch installation: each virtual environment (whose headers
    differ) keeps its own build in the shared cache instead of rebuilding over another's."""
    import torch

    return f"{NAME}_{hashlib.sha1(f'{torch.__file__}:{torch.__version__}'.encode()).hexdigest()[:10]}"


def _built(name: str) -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: where `load` builds

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:  # the private helper moved: only the message is lost
        return True


@functools.lru_cache(maxsize=None)
def native_module() -> Optional[ModuleType]:
    """The compiled extension, built on first use; None (with one warning) where it cannot be."""
    if os.environ.get(DISABLE, "1") == "0":
        return None
    # torch's extension builder warns on import that a CUDA build has no CUDA runtime: true
    # and irrelevant for a CPU-only extension.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        _ninja_on_path()
        name = _build_name()
        if not _built(name):
            print("iared: building the C++ blocks (once per environment, about a minute)", file=sys.stderr, flush=True)
        return load(name, [str(SOURCE)], extra_cflags=["-O3"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a header mismatch: fall back, never fail
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = next((ln for ln in lines if "error:" in ln), lines[-1]).strip()[:200]
        warnings.warn(f"iared: the C++ block could not be built ({reason}); using the PyTorch path",
                      RuntimeWarning, stacklevel=2)
        return None


def unavailable_reason() -> str:
    """Why `native_module()` is None, for an error message."""
    if os.environ.get(DISABLE, "1") == "0":
        return f"{DISABLE}=0 is set"
    return "it could not be built (see the warning above)"
