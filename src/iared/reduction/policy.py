"""The one interface every token policy implements, and the registry of policies by name.

Like whisper's `LogitFilter` (one `apply` method), a token policy has one method: given
the block about to run and the current tokens, say which tokens go on. Concretely it is
an `nn.Module` whose forward is

    forward(index, tokens, model, mode) -> (tokens, StageRecord | None)

called in front of every block of the backbone where `acts_before(index)` is True (by
default, every block). It returns the tokens unchanged (and no record) for blocks where
it does nothing. Policies that act inside a block (ATS selects after computing
attention) swap that block's class instead; see `iared.reduction.ats`.

Policies register a builder under a short name so `iared.patch(model, policy="ats")`
and `iared eval --methods ats` find them.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn



class TokenPolicy(nn.Module):
    """Base class: decides, in front of block `index`, which patch tokens go on.

    Subclasses define ``forward(index, tokens, model, mode) -> (Tokens, StageRecord | None)``.
    """

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings that rebuild this policy with `build_policy`."""
        return {}

    def acts_before(self, index: int) -> bool:
        """Whether `forward` may change or read the tokens in front of block `index`.

        The model calls the policy only where this is True, so blocks in between can keep
        their tokens packed (`iared.reduction.functional.PackedLayout`). The default, True
        everywhere, is always correct; policies that act at a few blocks say which.
        """
        return True


PolicyBuilder = Callable[..., nn.Module]
_POLICIES: dict[str, PolicyBuilder] = {}


def register_policy(name: str) -> Callable[[PolicyBuilder], PolicyBuilder]:
    """Decorator: `builder(model, **kwargs) -> policy` becomes available as `name`."""

    def deco(fn: PolicyBuilder) -> PolicyBuilder:
        _POLICIES[name] = fn
        return fn

    return deco


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def build_policy(name: str, model: nn.Module, **kwargs) -> nn.Module:
    """Build the policy registered as `name` for `model`."""
    if name not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(available_policies())}")
    return _POLICIES[name](model, **kwargs)
