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
from .reduction.policy import build_policy
from .reduction.interpreter import has_interpreters

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
            # Built, then attached as a module: its weights load below, so `patch`'s warning
            # about a default budget that drops nothing (fresh interpreters) does not apply.
            patch(model, build_policy(cfg.pop("name"), model, **cfg))
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


def load_model_file(checkpoint: PathLike, arch: Optional[str] = None) -> nn.Module:
    """Any model file a user has, as a model in eval mode on the CPU.

    An iared model file (`save_model`) rebuilds itself; any other checkpoint (timm or
    iared key layout) is loaded into the registry backbone `arch`, which a timm-layout
    `.safetensors` file names in its own metadata (`architecture`).

    Raises:
        UserError: a missing file, a foreign file without `arch`, an unknown arch, or
            weights that do not fit it.
    """
    from .backbones.checkpoint import load_pretrained
    from .errors import UserError

    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist")
    try:
        meta = read_metadata(path) if path.suffix == ".safetensors" else {}
        if "iared" in meta and arch is None:
            return load_model(path)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    arch = arch or meta.get("architecture")
    if arch is None:
        raise UserError(f"{path.name} is not an iared model file: pass --arch NAME (e.g. vit_tiny_patch16_224)")
    if arch not in list_models():
        raise UserError(f"unknown --arch {arch!r}; available: {', '.join(list_models())}")
    num_classes = meta.get("num_classes")
    model = create_model(arch, **({"num_classes": int(num_classes)} if str(num_classes or "").isdigit() else {}))
    try:
        load_pretrained(model, path)
    except CheckpointError as e:
        raise UserError(f"{path} does not fit --arch {arch}: {e}") from None
    model.model_meta = {"arch": arch, "data": None, "policy": None}
    return model.eval()


def check_data_fits(info: Any, model: nn.Module, data: str) -> None:
    """Raise a one-line UserError unless the data's images and labels fit the model.

    Labels given as indices (a `labels.tsv`, a `classes.tsv`) may use part of the head;
    otherwise the data's classes must be the head's, one for one.
    """
    from .errors import UserError

    c = model.config
    if tuple(info.img_size) != tuple(model.patch_embed.img_size) or info.in_chans != c.in_chans:
        raise UserError(f"data {data!r} gives {info.in_chans}x{info.img_size[0]}x{info.img_size[1]} images, "
                        f"the model expects {c.in_chans}x{model.patch_embed.img_size[0]}x{model.patch_embed.img_size[1]}")
    if getattr(info, "indexed", False):
        if info.num_classes > c.num_classes:
            raise UserError(f"data {data!r} has class index {info.num_classes - 1}, outside the model's head "
                            f"of {c.num_classes} classes")
    elif info.num_classes != c.num_classes:
        raise UserError(f"data has {info.num_classes} classes, the model's head {c.num_classes}")


# -- policy files: interpreters without the backbone ---------------------------------------

POLICY_KEY = "iared_policy"


def sha256_of(path: PathLike) -> str:
    """Hex sha256 of a file (which backbone a policy was trained on)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_policy(model: nn.Module, path: PathLike, arch: str, backbone_file: Optional[PathLike] = None,
                extra: Optional[dict[str, Any]] = None) -> None:
    """Write the IA-RED² interpreters of `model` alone: a small file that any copy of the
    same backbone weights can load (`load_policy` + `iared.patch`).

    Args:
        model: a backbone patched with a trained `IARedPolicy`.
        path: destination `.safetensors` file.
        arch: the backbone's registry name (recorded, checked by `iared eval --policy`).
        backbone_file: the weights the interpreters were trained on; its sha256 is recorded.
        extra: anything else JSON-serialisable to keep (e.g. how it was trained).
    """
    policy = getattr(model, "policy", None)
    if not has_interpreters(model):
        raise ValueError("save_policy needs a model patched with trained IA-RED² interpreters")
    meta = {
        "format": FORMAT_VERSION,
        "policy": policy.config(),
        "backbone": {"arch": arch, "embed_dim": model.config.embed_dim, "depth": model.config.depth,
                     "sha256": sha256_of(backbone_file) if backbone_file is not None else None},
        "extra": extra or {},
    }
    save_safetensors(policy.state_dict(), path, metadata={POLICY_KEY: json.dumps(meta)})


def read_policy_meta(path: PathLike) -> dict[str, Any]:
    """The JSON metadata of a policy file, or a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"policy file {path} does not exist")
    meta = read_metadata(path).get(POLICY_KEY) if path.suffix == ".safetensors" else None
    if meta is None:
        raise CheckpointError(f"{path} is not an iared policy file (written by iared.save_policy)")
    try:
        meta = json.loads(meta)
        cfg, bb = meta["policy"], meta["backbone"]
        int(bb["embed_dim"]), int(bb["depth"]), cfg["name"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: its policy metadata is damaged ({type(e).__name__}: {e})") from None
    return meta


def load_policy(path: PathLike) -> nn.Module:
    """The IA-RED² policy of a policy file, ready for `iared.patch(model, policy=...)`.

    Its `file_meta` attribute holds what the file records (the backbone arch and the
    sha256 of the weights it was trained on).
    """
    from .reduction.interpreter import IARedPolicy

    meta = read_policy_meta(path)
    cfg, bb = dict(meta["policy"]), meta["backbone"]
    if cfg.pop("name") != "iared":
        raise CheckpointError(f"{path}: only IA-RED² policies are stored in policy files")
    try:
        policy = IARedPolicy(int(bb["embed_dim"]), int(bb["depth"]), **cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its policy metadata does not build interpreters ({e})") from None
    load_into(policy, read_checkpoint(path), strict=True)
    policy.file_meta = meta
    return policy.eval()


def with_policy(model: nn.Module, policy_file: PathLike, backbone_file: Optional[PathLike] = None) -> nn.Module:
    """`model` patched with the interpreters of `policy_file`, for the commands' `--policy`.

    Raises:
        UserError: a file that is not a policy, or interpreters that do not fit the model.
        Weights other than those the policy was trained on (sha256) only warn: the same
        weights may come in another file.
    """
    import warnings

    from .errors import UserError

    try:
        policy = load_policy(policy_file)
        patched = patch(model, policy=policy)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    except ValueError as e:
        raise UserError(f"--policy {policy_file}: {e}") from None
    want = policy.file_meta["backbone"].get("sha256")
    if want and backbone_file is not None and sha256_of(backbone_file) != want:
        warnings.warn(f"{policy_file} was trained on other weights than {backbone_file} (sha256 differs)",
                      stacklevel=2)
    meta = dict(getattr(model, "model_meta", None) or {})
    patched.model_meta = {**meta, "policy": policy.config()}
    return patched
