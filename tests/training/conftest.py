"""Fixtures of the training tests: a tiny random backbone model file for cluttered-digits."""

from pathlib import Path

import pytest
import torch

import iared


DATA = "cluttered-digits"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A tiny random backbone model file for cluttered-digits (48x48, 1 channel, 10 classes)."""
    torch.manual_seed(0)
    model = iared.create_model("vit_custom", img_size=48, patch_size=8, in_chans=1, num_classes=10,
                               embed_dim=16, depth=2, num_heads=2)
    path = tmp_path_factory.mktemp("bb") / "backbone.safetensors"
    iared.save_model(model, path, arch="vit_custom", data={"spec": DATA})
    return path
