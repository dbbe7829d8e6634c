"""Shared fixtures. Tests that need the real data in ../shared skip cleanly without it.

The tests mirror the package: tests/<package>/test_<module>.py for src/iared/<package>/<module>.py,
tests/test_<module>.py for the top-level modules. Each folder is a package (an __init__.py), so
two folders may hold test files of the same name (data/test_video.py, evaluation/test_video.py).
Tests import what several folders share from tests/helpers.py as `from helpers import ...`.
"""

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
SHARED = TESTS.parents[1] / "shared"

# pytest's default (prepend) import mode already puts tests/ first on sys.path, as the folder
# above the test packages; said here so `helpers` imports under any import mode.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data/models folder beside the checkout (present in CI, absent in a user's clone)."""
    if not (SHARED / "data").is_dir():
        pytest.skip("needs ../shared (real data and models)")
    return SHARED


@pytest.fixture(autouse=True)
def _few_threads():
    # The suite runs on 2 cores; intra-op threads beyond that only add contention.
    torch.set_num_threads(2)
    yield
