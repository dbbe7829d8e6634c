"""`iared.patch(model, policy=...)`: attach a token policy to an existing backbone.

The backbone keeps its weights and its class; the policy becomes a submodule
(`model.policy`, so its parameters appear in the state dict under `policy.`) and is
called in front of every block. `iared.unpatch(model)` removes it again.

    model = iared.create_model("deit_small_patch16_224")
    iared.patch(model, policy="iared", groups=3)        # IA-RED² interpreters
    logits, info = model(images, return_info=True)      # info.stages: per-group records
"""

from __future__ import annotations

from typing import Union

from torch import nn

from .reduction.policy import available_policies, build_policy


def patch(model: nn.Module, policy: Union[str, nn.Module] = "iared", **kwargs) -> nn.Module:
    """Attach `policy` (a registered name or a policy module) to `model`, in place.

    Args:
        model: a backbone of the registry (`iared.create_model`) or a loaded checkpoint.
        policy: a name from `iared.available_policies()` or a policy module.
        **kwargs: the policy's settings (e.g. ``groups=3`` for "iared", ``rho=0.87`` for "ats").

    Returns:
        The same model object, now with `model.policy` set. A policy attached before is
        detached first (ATS's blocks become plain blocks again); if the new one cannot be
        built or attached, the model keeps the old one.
    """
    if not hasattr(model, "policy"):
        raise TypeError(f"{type(model).__name__} has no policy hook; use a backbone from iared.create_model")
    if not isinstance(policy, str) and kwargs:
        raise TypeError("settings are only accepted with a policy name")
    previous = model.policy
    if previous is not None:
        unpatch(model)  # policies are built on, and attached to, the plain backbone
    try:
        if isinstance(policy, str):
            policy = build_policy(policy, model, **kwargs)
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


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the policy attached by `patch`; the backbone computes as before."""
    detach = getattr(model.policy, "detach_from", None)
    if callable(detach):
        detach(model)
    model.policy = None
    return model


__all__ = ["patch", "unpatch", "available_policies"]
