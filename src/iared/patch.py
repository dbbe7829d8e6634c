"""`iared.patch(model, policy=...)`: attach a token policy to an existing backbone.

The backbone keeps its weights and its class; the policy becomes a submodule
(`model.policy`, so its parameters appear in the state dict under `policy.`) and is
called in front of every block. `iared.unpatch(model)` removes it again.

    model = iared.create_model("deit_small_patch16_224")
    iared.patch(model, policy="iared", groups=3)        # IA-RED² interpreters
    logits, info = model(images, return_info=True)      # info.stages: per-group records
    iared.patch(model, "ats", budget=0.7)               # every policy: one budget
    model.policy.budget = 0.5                           # ... settable after patching

Models users already hold (timm's ViT / DeiT, Hugging Face's ViT) are converted into our
backbone first (`iared.integrations`), so the call returns a new object for them:

    model = iared.patch(timm.create_model("deit_small_patch16_224"), policy="ats")
    timm_model = iared.unpatch(model)                   # the original, same parameters
"""

from __future__ import annotations

import warnings
from typing import Any, Union

from torch import nn

from .integrations import library_of, to_iared, to_source
from .reduction.policy import available_policies, build_policy


_WARNED: set[str] = set()  # policy names already warned about dropping nothing


def patch(model: nn.Module, policy: Union[str, nn.Module] = "iared", budget: Any = None,
          **kwargs) -> nn.Module:
    """Attach `policy` (a registered name or a policy module) to `model`.

    Args:
        model: a backbone of the registry (`iared.create_model`) or a loaded checkpoint,
            patched in place; or timm's `VisionTransformer` / `VisionTransformerDistilled`
            or Hugging Face's `ViTModel` / `ViTForImageClassification`, converted first
            (see `iared.integrations`; features our backbone lacks raise an error).
        policy: a name from `iared.available_policies()` or a policy module.
        budget: how much the policy drops (its threshold, rho, keep ratio or r; see
            `iared.reduction.policy`); None: the policy's default. Also `model.policy.budget`.
        **kwargs: the policy's other settings (e.g. ``groups=3`` for "iared").

    Returns:
        For our own models, the same object, now with `model.policy` set. For a timm or
        Hugging Face model, a NEW iared `VisionTransformer` (use the returned object): timm's
        parameters are shared with it (training one trains both), Hugging Face's are
        copied (`iared.unpatch` writes them back). A policy attached before is detached
        first (ATS's blocks become plain blocks again); if the new one cannot be built or
        attached, the model keeps the old one.
    """
    if not isinstance(policy, str) and (kwargs or budget is not None):
        raise TypeError("settings are only accepted with a policy name")
    model = to_iared(model)
    if not hasattr(model, "policy"):
        raise TypeError(f"{type(model).__name__} has no policy hook; use a backbone from iared.create_model")
    previous = model.policy
    if previous is not None:
        _detach(model)  # policies are built on, and attached to, the plain backbone
    try:
        if isinstance(policy, str):
            name, policy = policy, build_policy(policy, model, budget=budget, **kwargs)
            _warn_if_inert(name, policy, budget)
        # Policies that act inside blocks (ATS) patch the blocks themselves when attached.
        attach = getattr(policy, "attach", None)
        if callable(attach):
            attach(model)
    except BaseException:
        if previous is not None:
            patch(model, previous)
        raise
    model.policy = policy
    return model


def _warn_if_inert(name: str, policy: nn.Module, budget: Any) -> None:
    """Once per policy name: say so when a default budget drops nothing."""
    reason = policy.drops_nothing() if budget is None and hasattr(policy, "drops_nothing") else None
    if reason and name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"policy {name!r} as patched drops no token: {reason}", stacklevel=3)


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the policy attached by `patch`; the backbone computes as before.

    Args:
        model: a model returned by `patch`.

    Returns:
        `model` itself for our own backbones. For a model `patch` converted from timm or
        Hugging Face, the original model (timm: its parameters are the shared ones;
        Hugging Face: the current weights written back into it); the converted model,
        if still held, has no policy any more. A timm / Hugging Face model never
        converted is returned as it is.
    """
    if library_of(model) is not None:
        return model
    _detach(model)
    return to_source(model)


def _detach(model: nn.Module) -> None:
    detach = getattr(model.policy, "detach_from", None)
    if callable(detach):
        detach(model)
    model.policy = None


__all__ = ["patch", "unpatch", "available_policies"]
