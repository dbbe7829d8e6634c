"""Models users already hold, as iared backbones: timm's ViT / DeiT and Hugging Face's ViT.

`iared.patch(model, policy=...)` hands a model whose class lives in `timm.` or
`transformers.` to `to_iared`, which converts it into our `VisionTransformer`
(`iared.integrations.timm.from_timm`, `iared.integrations.hf.from_hf`); `iared.unpatch`
gives the original back through `to_source`. timm and transformers are imported here
only when such a model is handed in, so `import iared` needs neither (they are the
`iared[timm]` and `iared[hf]` extras).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

# A plain attribute (in `__dict__`, not a submodule): the original must not show up in the
# converted model's `modules()`, `state_dict()` or `cpu_kernels`, which would see its
# parameters twice.
SOURCE_ATTR = "_iared_source"

_LIBRARIES = ("timm", "transformers")


def library_of(model: nn.Module) -> Optional[str]:
    """The foreign library `model`'s class comes from ("timm", "transformers"), or None.

    Decided from the class's module name, so neither library is imported to ask.
    """
    root = type(model).__module__.split(".", 1)[0]
    return root if root in _LIBRARIES else None


def source_of(model: nn.Module) -> Optional[nn.Module]:
    """The timm / Hugging Face model `model` was converted from, or None."""
    return model.__dict__.get(SOURCE_ATTR)


def remember_source(model: nn.Module, source: nn.Module) -> None:
    """Record `source` on the converted `model` (see `SOURCE_ATTR` for why not a submodule)."""
    model.__dict__[SOURCE_ATTR] = source


def to_iared(model: nn.Module) -> nn.Module:
    """A timm / Hugging Face ViT converted into an iared `VisionTransformer`; any other model as is.

    Args:
        model: timm's `VisionTransformer` / `VisionTransformerDistilled`, transformers'
            `ViTModel` / `ViTForImageClassification`, or anything else (returned unchanged).

    Returns:
        A new iared model for a foreign one (timm: weights shared; transformers: copied),
        else `model` itself.
    """
    library = library_of(model)
    if library == "timm":
        from .timm import from_timm

        return from_timm(model)
    if library == "transformers":
        from .hf import from_hf

        return from_hf(model)
    return model


def to_source(model: nn.Module) -> nn.Module:
    """The original timm / Hugging Face model of a converted `model` (HF weights written
    back), or `model` itself when it was not converted."""
    source = source_of(model)
    if source is None:
        return model
    if library_of(source) == "timm":
        from .timm import to_timm

        return to_timm(model)
    from .hf import to_hf

    return to_hf(model)


__all__ = ["library_of", "remember_source", "source_of", "to_iared", "to_source"]
