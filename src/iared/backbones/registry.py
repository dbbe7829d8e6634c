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
    """Build a registered model with random weights; `overrides` replace config fields."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name](**overrides)


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
