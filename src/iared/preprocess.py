"""How a model's input images are prepared: the config that travels with the model.

A model is only right on inputs prepared the way it was trained. timm keeps that recipe
in `pretrained_cfg`; we keep the same fields, under the same names, in the plain dict
`model.pretrained_cfg`:

    input_size      (C, H, W)
    mean, std       per-channel normalisation of [0, 1] pixels
    interpolation   resampling filter of the resize ("bicubic", "bilinear", ...)
    crop_pct        the short side is resized to floor(H / crop_pct), then a center crop
    crop_mode       "center" (timm's default) or "squash" (resize to H x W, no crop)

It comes from a registry arch's defaults (`iared.backbones.registry`), is replaced by the
fields in a checkpoint's safetensors metadata (timm's layout: strings such as
`"mean": "0.5,0.5,0.5"`, `"input_size": "224"`), is written by `save_model`, and the
image loaders apply it through `loader_options`. This module depends on nothing else of
iared: every layer may use it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash")


class PreprocessError(ValueError):
    """A preprocessing field that cannot be used; the message names it."""


def _floats(value: Any, key: str) -> tuple[float, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
    elif isinstance(value, (int, float)):
        value = [value]
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise PreprocessError(f"preprocessing {key} must be numbers, got {value!r}") from None
    if not out:
        raise PreprocessError(f"preprocessing {key} is empty")
    return out


def parse(cfg: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The preprocessing fields of `cfg` (a timm `pretrained_cfg`, or string metadata), typed.

    Other keys are ignored; absent fields stay absent. `input_size` may be one side
    ("224", as timm writes into safetensors metadata), (H, W) or (C, H, W); it is returned
    as (C, H, W) with C taken from `mean` when only sides are given (3 if unknown).

    Raises:
        PreprocessError: a field of the wrong type or an unknown interpolation / crop mode.
    """
    cfg = dict(cfg or {})
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        if cfg.get(key) is not None:
            out[key] = _floats(cfg[key], key)
    if "std" in out and not all(s > 0 for s in out["std"]):
        raise PreprocessError(f"preprocessing std must be positive, got {out['std']}")
    if cfg.get("input_size") is not None:
        size = tuple(int(v) for v in _floats(cfg["input_size"], "input_size"))
        if len(size) == 1:
            size = (size[0], size[0])
        if len(size) == 2:
            size = (len(out.get("mean", (0, 0, 0))),) + size
        if len(size) != 3 or min(size) < 1:
            raise PreprocessError(f"preprocessing input_size must be (C, H, W), got {cfg['input_size']!r}")
        out["input_size"] = size
    if cfg.get("crop_pct") is not None:
        pct = float(_floats(cfg["crop_pct"], "crop_pct")[0])
        if not 0 < pct <= 1:
            raise PreprocessError(f"preprocessing crop_pct must be in (0, 1], got {pct}")
        out["crop_pct"] = pct
    for key, allowed in (("interpolation", INTERPOLATIONS), ("crop_mode", CROP_MODES)):
        if cfg.get(key) is not None:
            value = str(cfg[key]).strip().lower()
            if value not in allowed:
                raise PreprocessError(f"preprocessing {key} {value!r} is not supported: use one of {', '.join(allowed)}")
            out[key] = value
    return out


def to_metadata(cfg: Mapping[str, Any]) -> dict[str, str]:
    """`cfg`'s preprocessing fields as safetensors metadata strings (timm's layout)."""
    out = {}
    for key, value in parse(cfg).items():
        out[key] = ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
    return out


def loader_options(cfg: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Keyword arguments of the image loaders (`img_size`, `mean`, `std`, `crop_pct`,
    `interpolation`, `crop_mode`) for the fields `cfg` has."""
    p = parse(cfg)
    out: dict[str, Any] = {k: p[k] for k in ("mean", "std", "crop_pct", "interpolation", "crop_mode") if k in p}
    if "input_size" in p:
        c, h, w = p["input_size"]
        if h != w:
            raise PreprocessError(f"input_size {p['input_size']}: only square inputs are supported")
        out["img_size"] = h
    return out
