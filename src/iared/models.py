"""Self-contained model files: weights + everything needed to rebuild the model.

A model file is a `.safetensors` file (it cannot carry code) whose metadata holds, as
JSON under the key "iared": the registry name and full architecture config, the attached
policy's settings, and (optionally) the data config the model was trained on. So
`iared eval` and `iared interpret` need nothing but the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .backbones.checkpoint import CheckpointError, PathLike, load_into, read_checkpoint, save_safetensors
from .backbones.registry import create_model, list_models
from .patch import patch

FORMAT_VERSION = 1


def save_model(model: nn.Module, path: PathLike, arch: str, data: Optional[dict[str, Any]] = None,
               extra: Optional[dict[str, Any]] = None) -> None:
    """Write `model` (backbone + policy) and the config that rebuilds it, atomically.

    Args:
        model: a registry backbone, possibly patched.
        path: destination `.safetensors` file.
        arch: the registry name the backbone was created with.
        data: the data config it was trained on (kind, img size, mean/std, class names).
        extra: anything else JSON-serialisable to keep (e.g. training summary).
    """
    if arch not in list_models():  # load_model rebuilds the backbone by this name
        raise ValueError(f"unknown arch {arch!r}; see iared.list_models()")
    policy = getattr(model, "policy", None)
    meta = {
        "format": FORMAT_VERSION,
        "arch": arch,
        "config": model.config.to_dict(),
        "policy": policy.config() if policy is not None and hasattr(policy, "config") else None,
        "data": data,
        "extra": extra or {},
    }
    save_safetensors(model.state_dict(), path, metadata={"iared": json.dumps(meta)})


def read_model_meta(path: PathLike) -> dict[str, Any]:
    """The JSON metadata of a model file, or a CheckpointError if it has none."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path} is not an iared model file (.safetensors written by iared)")
    read_checkpoint(path)  # validates the file with a clear error first
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("iared")
    if meta is None:
        raise CheckpointError(f"{path} has no iared metadata: load it with iared.load_pretrained into a backbone")
    return json.loads(meta)


def load_model(path: PathLike, map_location: str = "cpu") -> nn.Module:
    """Rebuild a model written by `save_model`: backbone, policy and weights, in eval mode."""
    meta = read_model_meta(path)
    model = create_model(meta["arch"], **meta["config"])
    if meta.get("policy"):
        cfg = dict(meta["policy"])
        patch(model, policy=cfg.pop("name"), **cfg)
    sd = read_checkpoint(path)
    load_into(model, sd, strict=True)
    model.model_meta = meta  # plain attribute: where the model came from (data config, ...)
    return model.to(map_location).eval()
