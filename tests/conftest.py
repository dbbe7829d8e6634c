"""Shared fixtures. Tests that need the real data in ../shared skip cleanly without it."""

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


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
