"""A model is just a name: `create_model("deit_small_patch16_224")`.

The idea of timm's `register_model` / `create_model` (timm/models/_registry.py): each
architecture is a function registered under its name; overrides are passed through, so
`create_model("deit_small_patch16_224", num_classes=10, img_size=384)` works.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .vit import ViTConfig, VisionTransformer

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register `fn` under its own name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model with random weights; `overrides` replace config fields.

    The model carries its preprocessing as `model.pretrained_cfg` (see `iared.preprocess`):
    the arch's published defaults, with `input_size` following the built model.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    model = _MODELS[name](**overrides)
    model.pretrained_cfg = default_preprocess(name, model)
    return model


# What the published weights of each arch expect (timm's pretrained_cfg of the tags these
# names resolve to; the last two as their SOURCES describe). Archs trained here have none:
# their model files record the data they were trained on.
_AUGREG = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.9, crop_mode="center")
_DEIT = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic", crop_pct=0.875,
             crop_mode="center")
_PREPROCESS: dict[str, dict] = {
    **{f"vit_{s}_patch16_224": _AUGREG for s in ("tiny", "small", "base")},
    **{f"deit_{s}_patch16_224": _DEIT for s in ("tiny", "small", "base")},
    **{f"deit_{s}_distilled_patch16_224": _DEIT for s in ("tiny", "small", "base")},
    "deit_base_patch16_384": {**_DEIT, "crop_pct": 1.0},
    "vit_mnist_patch7_28": dict(mean=(0.1307,), std=(0.3081,), interpolation="bilinear", crop_pct=1.0),
    "vit_tiny8_patch4_32": dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear", crop_pct=1.0),
}


def default_preprocess(name: str, model: nn.Module) -> dict:
    """The published preprocessing of arch `name` for the built `model` ({} if none is known)."""
    cfg = dict(_PREPROCESS.get(name, {}))
    if cfg and hasattr(model, "patch_embed"):
        h, w = model.patch_embed.img_size
        cfg["input_size"] = (model.config.in_chans, h, w)
    return cfg


def _vit(overrides: dict, **defaults) -> VisionTransformer:
    return VisionTransformer(ViTConfig(**{**defaults, **overrides}))


# Widths/depths/heads of timm's ViT and DeiT (DeiT reuses the ViT architecture).
_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


def _register_family() -> None:
    for size, dims in _SIZES.items():
        for family in ("vit", "deit"):
            name = f"{family}_{size}_patch16_224"

            def make(_dims=dims, **kw):
                return _vit(kw, img_size=224, patch_size=16, qkv_bias=True, **_dims)

            make.__name__ = name
            register_model(make)

            if family == "deit":
                dname = f"deit_{size}_distilled_patch16_224"

                def make_d(_dims=dims, **kw):
                    return _vit(kw, img_size=224, patch_size=16, qkv_bias=True, distilled=True, **_dims)

                make_d.__name__ = dname
                register_model(make_d)


_register_family()


@register_model
def deit_base_patch16_384(**kw) -> VisionTransformer:
    return _vit(kw, img_size=384, patch_size=16, qkv_bias=True, **_SIZES["base"])


@register_model
def vit_custom(**kw) -> VisionTransformer:
    """The generic constructor for the small models this project trains.

    Every `ViTConfig` field is an override, e.g.
    ``create_model("vit_custom", img_size=64, patch_size=4, in_chans=1, embed_dim=96,
    depth=6, num_heads=3, num_classes=10)``.
    """
    return _vit(kw)


# -- foreign pretrained checkpoints (../shared/models, see its SOURCES.md) --------------

@register_model
def vit_mnist_patch7_28(**kw) -> VisionTransformer:
    """The old lucidrains vit-pytorch MNIST model: 28x28x1, patch 7, dim 64, depth 6,
    8 heads, MLP 128, no qkv bias, no final norm, two-layer head, attention scaled by
    dim**-0.5 (not head_dim**-0.5), PyTorch's default LayerNorm eps."""
    return _vit(kw, img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=6,
                num_heads=8, mlp_ratio=2.0, qkv_bias=False, final_norm=False, head_hidden=128,
                attn_scale=64 ** -0.5, norm_eps=1e-5)


@register_model
def vit_tiny8_patch4_32(**kw) -> VisionTransformer:
    """A timm-layout CIFAR-10 ViT: 32x32x3, patch 4, dim 8, depth 6, 2 heads, no qkv bias."""
    return _vit(kw, img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=8, depth=6,
                num_heads=2, mlp_ratio=4.0, qkv_bias=False)
