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

from .backbones.checkpoint import (CheckpointError, PathLike, load_into, read_checkpoint, read_metadata,
                                   read_preprocess, save_safetensors)
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
    from .preprocess import to_metadata

    policy = getattr(model, "policy", None)
    preprocess = dict(getattr(model, "pretrained_cfg", None) or {})
    if data:  # what the model was trained on is what it expects
        preprocess.update({k: data[k] for k in ("mean", "std") if data.get(k) is not None})
    if hasattr(model, "patch_embed"):
        preprocess["input_size"] = (model.config.in_chans, *model.patch_embed.img_size)
    meta = {
        "format": FORMAT_VERSION,
        "arch": arch,
        "config": model.config.to_dict(),
        "policy": policy.config() if policy is not None and hasattr(policy, "config") else None,
        "data": data,
        "extra": extra or {},
    }
    # The preprocessing also goes at the top level in timm's layout, where `load_pretrained`
    # (and any tool reading timm's files) finds it.
    save_safetensors(model.state_dict(), path, metadata={**to_metadata(preprocess), "iared": json.dumps(meta)})


def read_model_meta(path: PathLike) -> dict[str, Any]:
    """The JSON metadata of a model file, or a CheckpointError if it has none."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path} is not an iared model file (.safetensors written by iared)")
    meta = read_metadata(path).get("iared")
    if meta is None:
        raise CheckpointError(f"{path} has no iared metadata: load it with iared.load_pretrained into a backbone")
    try:
        meta = json.loads(meta)
    except ValueError as e:
        raise CheckpointError(f"{path}: its iared metadata is not JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arch"), str) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: its iared metadata lacks the arch and config that rebuild the model")
    return meta


def load_model(path: PathLike, map_location: str = "cpu") -> nn.Module:
    """Rebuild a model written by `save_model`: backbone, policy and weights, in eval mode."""
    meta = read_model_meta(path)
    try:
        model = create_model(meta["arch"], **meta["config"])
        if meta.get("policy"):
            cfg = dict(meta["policy"])
            patch(model, policy=cfg.pop("name"), **cfg)
        data = dict(meta.get("data") or {})
        means = {k: tuple(float(v) for v in data[k]) for k in ("mean", "std") if data.get(k) is not None}
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        # Metadata that names an unknown arch or policy, bad config fields, and the like.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot build the model of {path}: {first}") from None
    sd = read_checkpoint(path)
    load_into(model, sd, strict=True)
    # Preprocessing: the arch's defaults, then the data it was trained on (files written
    # before the preprocessing was recorded), then what the file records.
    model.pretrained_cfg.update(means)
    model.pretrained_cfg.update(read_preprocess(path))
    model.model_meta = meta  # plain attribute: where the model came from (data config, ...)
    return model.to(map_location).eval()
