"""Loading weights safely: `.pth`/`.pt` with `weights_only=True`, and `.safetensors`.

A pickle is never unpickled with arbitrary code: `torch.load(weights_only=True)` refuses
any global outside tensors and plain containers, and we turn that refusal into a
`CheckpointError` with one clear line. Every user-facing problem with a checkpoint
(missing file, truncated, code payload, wrong architecture) is a `CheckpointError`, which
the CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

PathLike = Union[str, os.PathLike]


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read a checkpoint file into a dict, never executing code from it.

    Args:
        path: a `.safetensors` file, or a torch pickle (`.pth`, `.pt`, `.bin`, ...).

    Returns:
        The top-level dict as stored (a state dict or a wrapper such as {'model': ...}).

    Raises:
        CheckpointError: missing, empty, truncated, unsafe or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {_one_line(e)}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the global it blocked ("unsupported GLOBAL
        # posix.system ..."); any other unpickling error means a damaged or foreign file.
        if "GLOBAL" in str(e):
            raise CheckpointError(
                f"refusing to load {path}: it needs arbitrary Python objects to unpickle "
                "(only tensors and plain containers are allowed)") from None
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a checkpoint)") from None
    except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere inside the unpickler
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a checkpoint): {_one_line(e)}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """Find the state dict inside common wrappers and strip DDP's `module.` prefix.

    Handles {'model': sd}, {'state_dict': sd}, {'model_state': sd} (TimeSformer),
    {'model_ema': sd}, and prefixes `module.` / `model.`.
    """
    for key in ("model", "state_dict", "model_state", "model_ema", "module"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            obj = inner
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError("checkpoint holds no tensors")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def convert_lucidrains_vit(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map the old lucidrains vit-pytorch layout to timm's names.

    That layout (used by `../shared/models/vit_mnist_gauravpbhagwat.pth`):
    `pos_embedding`, `cls_token`, `patch_to_embedding` (a Linear over flattened
    (p1 p2 c) patches), `transformer.layers.N.0.fn.{norm, fn.to_qkv, fn.to_out}`,
    `transformer.layers.N.1.fn.{norm, fn.net.0, fn.net.2}`, `mlp_head.{0,2}`.
    The patch Linear becomes the equivalent Conv2d (weight reshaped to (D, C, p, p)).
    """
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if k == "pos_embedding":
            out["pos_embed"] = v
        elif k == "cls_token":
            out[k] = v
        elif k.startswith("patch_to_embedding."):
            out["patch_embed.proj." + parts[-1]] = v
        elif k.startswith("transformer.layers."):
            n, sub = parts[2], parts[3]
            rest = ".".join(parts[5:])
            mapping = {
                "0": {"norm.weight": "norm1.weight", "norm.bias": "norm1.bias",
                      "fn.to_qkv.weight": "attn.qkv.weight", "fn.to_qkv.bias": "attn.qkv.bias",
                      "fn.to_out.weight": "attn.proj.weight", "fn.to_out.bias": "attn.proj.bias",
                      "fn.to_out.0.weight": "attn.proj.weight", "fn.to_out.0.bias": "attn.proj.bias"},
                "1": {"norm.weight": "norm2.weight", "norm.bias": "norm2.bias",
                      "fn.net.0.weight": "mlp.fc1.weight", "fn.net.0.bias": "mlp.fc1.bias",
                      "fn.net.2.weight": "mlp.fc2.weight", "fn.net.2.bias": "mlp.fc2.bias",
                      "fn.net.3.weight": "mlp.fc2.weight", "fn.net.3.bias": "mlp.fc2.bias"},
            }[sub]
            if rest not in mapping:
                raise CheckpointError(f"unrecognised lucidrains key {k}")
            out[f"blocks.{n}.{mapping[rest]}"] = v
        elif k.startswith("mlp_head."):
            out["head." + ".".join(parts[1:])] = v
        else:
            raise CheckpointError(f"unrecognised lucidrains key {k}")
    w = out.get("patch_embed.proj.weight")
    if w is not None and w.dim() == 2:
        dim, flat = w.shape
        for chans in (1, 3):
            p = int(round((flat / chans) ** 0.5))
            if p * p * chans == flat:
                break
        else:
            raise CheckpointError(f"cannot infer the patch size from a patch embedding of width {flat}")
        # lucidrains flattens patches as (p1 p2 c): put channels first for the conv.
        out["patch_embed.proj.weight"] = w.reshape(dim, p, p, chans).permute(0, 3, 1, 2).contiguous()
    return out


def resample_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], num_prefix: int) -> Tensor:
    """Bicubic resampling of a (1, P + h*w, D) position embedding to a new patch grid.

    As in DeiT/timm fine-tuning at a new resolution (224 -> 384 is the paper's Table 4):
    prefix-token embeddings are kept, the grid part is interpolated.
    """
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    n = grid.shape[1]
    old = int(round(n ** 0.5))
    if n < 1 or old * old != n:  # an empty grid too (found by fuzzing the .pth loader)
        raise CheckpointError(f"position embedding of {n} patches is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    D = grid.shape[-1]
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def load_into(model: nn.Module, sd: Mapping[str, Tensor], strict: bool = True) -> None:
    """Load a state dict, resampling `pos_embed` if the grid differs; one clear error otherwise.

    Raises:
        CheckpointError: listing missing keys, unexpected keys and keys of the wrong shape.
    """
    sd = dict(sd)
    adapt = getattr(model, "adapt_state_dict", None)  # e.g. JointST resamples time_embed
    if callable(adapt):
        sd = adapt(sd)
    own = model.state_dict()
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        prefix = getattr(model, "num_prefix_tokens", 1)
        if grid is not None and sd["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
            sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], tuple(grid), prefix)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if wrong or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
        if wrong:
            parts.append(f"wrong shape {len(wrong)}: {_short(wrong)}")
        raise CheckpointError("checkpoint does not fit the model — " + "; ".join(parts))
    model.load_state_dict(sd, strict=strict)


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


HEAD_PREFIXES = ("head.", "head_dist.")  # the classifier(s) of our ViTs, timm's names


def load_pretrained(model: nn.Module, path: PathLike, strict: bool = True, new_head: bool = False) -> nn.Module:
    """Load a timm/DeiT/foreign checkpoint file into `model` (in place) and return it.

    Args:
        model: the backbone to fill.
        path: the checkpoint (.pth/.pt/.safetensors, plain or wrapped state dict).
        strict: every key of the model and of the checkpoint must match (shapes always must).
        new_head: keep the model's own classifier (fine-tuning an ImageNet checkpoint for
            another number of classes, as timm does when `num_classes` differs): the
            checkpoint's `head.*` / `head_dist.*` are not loaded.
    """
    sd = unwrap_state_dict(read_checkpoint(path))
    preprocess = read_preprocess(path)
    if "pos_embedding" in sd and any(k.startswith("transformer.layers.") for k in sd):
        sd = convert_lucidrains_vit(sd)
    if new_head:
        own = model.state_dict()
        sd = {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}
        sd.update({k: v for k, v in own.items() if k.startswith(HEAD_PREFIXES)})  # as it is
    load_into(model, sd, strict=strict)
    if preprocess:
        # The file's recipe replaces the arch's defaults; the input size stays the model's
        # (a 224 px checkpoint loaded into a 384 px model is resized to 384).
        preprocess.pop("input_size", None)
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **preprocess}
    return model


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a `.safetensors` file ({} for other formats or none)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    read_checkpoint(path)  # validates the file with a clear error first
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_preprocess(path: PathLike) -> dict[str, Any]:
    """The preprocessing fields (`iared.preprocess`) a checkpoint's metadata records ({} if none)."""
    from ..preprocess import PreprocessError, parse

    try:
        return parse(read_metadata(path))
    except PreprocessError as e:
        raise CheckpointError(f"{path}: {e}") from None


def save_safetensors(tensors: Mapping[str, Tensor], path: PathLike, metadata: Optional[dict[str, str]] = None) -> None:
    """Write tensors as safetensors through `iared.fileio.atomic_write` (a unique temporary
    file in the destination folder, removed on failure; the usual file permissions)."""
    from safetensors.torch import save

    from ..fileio import atomic_write

    atomic_write(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))
