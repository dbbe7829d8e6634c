"""The one interface every token policy implements, and the registry of policies by name.

Like whisper's `LogitFilter` (one `apply` method), a token policy has one method: given
the block about to run and the current tokens, say which tokens go on. Concretely it is
an `nn.Module` whose forward is

    forward(index, tokens, model, mode) -> (tokens, StageRecord | None)

called in front of every block of the backbone where `acts_before(index)` is True (by
default, every block). It returns the tokens unchanged (and no record) for blocks where
it does nothing. Policies that act inside a block (ATS selects after computing
attention) swap that block's class instead (`BlockSwapPolicy`; ATS, ToMe, EViT).

Every policy has one budget, `policy.budget`: the setting that says how much it drops,
readable and settable after patching, and given at patch time as
`iared.patch(model, "ats", budget=0.7)` or on the command line as `ats@0.7`. Which
setting that is, per policy (`budget_setting`):

    iared                   threshold   keep a token whose score exceeds it (one, or one per group); higher drops more
    ats, topk, ats_*        rho         K = max(round(rho * N), min_k) per stage; lower drops more
    random, attention       keep_ratio  share of the patch tokens kept at the input; lower drops more
    tempdiff                keep_ratio  share of the clip's patch tokens kept; lower drops more
    evit                    keep_rate   share of a stage's patch tokens kept; lower drops more
    tome                    r           tokens merged in every block; higher drops more

Policies register a builder under a short name so `iared.patch(model, policy="ats")`
and `iared eval --methods ats` find them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

from torch import nn


class TokenPolicy(nn.Module):
    """Base class: decides, in front of block `index`, which patch tokens go on.

    Subclasses define ``forward(index, tokens, model, mode) -> (Tokens, StageRecord | None)``
    and name the setting behind `budget` in `budget_setting`.
    """

    budget_setting: ClassVar[Optional[str]] = None

    @property
    def budget(self) -> Any:
        """How much the policy drops: the value of its `budget_setting` (None: it has none)."""
        return None if self.budget_setting is None else getattr(self, self.budget_setting)

    @budget.setter
    def budget(self, value: Any) -> None:
        if self.budget_setting is None:
            raise AttributeError(f"{type(self).__name__} has no budget")
        setattr(self, self.budget_setting, value)

    def drops_nothing(self) -> Optional[str]:
        """Why the policy, as it is now, keeps every token; None when it may drop some."""
        return None

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings that rebuild this policy with `build_policy`."""
        return {}

    def acts_before(self, index: int) -> bool:
        """Whether `forward` may change or read the tokens in front of block `index`.

        The model calls the policy only where this is True, so blocks in between can keep
        their tokens packed (`iared.backbones.packing.PackedLayout`). The default, True
        everywhere, is always correct; policies that act at a few blocks say which.
        """
        return True


class BlockSwapPolicy(TokenPolicy):
    """A policy that works inside some blocks: `attach` swaps their class to `block_class`
    (a subclass of the backbone's `Block`: same object, same weights, as ToMe patches
    timm's blocks) and gives each the policy's shared `settings` as `<key>`, its index as
    `<key>_index` and the model's grid size as `<key>_grid`; `detach_from` undoes it.
    The swapped-in block's `forward` returns ``(tokens, StageRecord)`` instead of tokens.
    Nothing happens in front of blocks.

    Subclasses set `block_class`, `key` and `settings`, and call `swap_blocks` in `attach`.
    """

    block_class: type
    key: str
    settings: Any

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.settings)}

    def swap_blocks(self, model: nn.Module, indices: Sequence[int]) -> None:
        from ..backbones.vit import Block

        for i in indices:  # all checked before any block is touched
            if not isinstance(model.blocks[i], Block):
                raise TypeError(f"block {i} is a {type(model.blocks[i]).__name__}, not an iared Block")
        for i in indices:
            blk = model.blocks[i]
            if type(blk) is not self.block_class:
                blk.__dict__[f"_{self.key}_original_class"] = type(blk)
                blk.__class__ = self.block_class
            setattr(blk, self.key, self.settings)
            setattr(blk, f"{self.key}_index", i)
            setattr(blk, f"{self.key}_grid", model.grid_size)

    def detach_from(self, model: nn.Module) -> None:
        """Restore the original block classes."""
        for blk in model.blocks:
            if isinstance(blk, self.block_class):
                blk.__class__ = blk.__dict__.pop(f"_{self.key}_original_class", self.block_class.__mro__[1])
                for name in (self.key, f"{self.key}_index", f"{self.key}_grid"):
                    blk.__dict__.pop(name, None)

    def attach(self, model: nn.Module) -> None:
        """Swap the class of the blocks listed in `settings.stages`."""
        self.swap_blocks(model, self.settings.stages)

    def acts_before(self, index: int) -> bool:
        return False  # the swapped blocks act inside

    def forward(self, index: int, tokens: Any, model: nn.Module, mode: Any = None):
        return tokens, None


def stage_blocks(stages: Union[int, Sequence[int]], depth: int, method: str) -> list[int]:
    """The sorted, distinct block indices of `stages` (one int: one stage), each in 0..depth-1."""
    stages = sorted({int(s) for s in ([stages] if isinstance(stages, int) else stages)})
    if not stages or stages[0] < 0 or stages[-1] >= depth:
        raise ValueError(f"{method} stages {stages} must be block indices in 0..{depth - 1}")
    return stages


def shared_setting(name: str, check: Callable[[Any], Any] = lambda value: value) -> property:
    """A `BlockSwapPolicy` attribute that reads and writes `settings.<name>` (so the swapped
    blocks see a new value at once), each new value passed through `check` first."""
    return property(lambda self: getattr(self.settings, name),
                    lambda self, value: setattr(self.settings, name, check(value)),
                    doc=f"`settings.{name}`, shared with the swapped blocks.")


PolicyBuilder = Callable[..., nn.Module]
_POLICIES: dict[str, PolicyBuilder] = {}
_BUDGETS: dict[str, Optional[str]] = {}


def register_policy(name: str, policy_class: type) -> Callable[[PolicyBuilder], PolicyBuilder]:
    """Decorator: `builder(model, **kwargs) -> policy_class instance` becomes available as `name`."""

    def deco(fn: PolicyBuilder) -> PolicyBuilder:
        _POLICIES[name] = fn
        _BUDGETS[name] = policy_class.budget_setting
        return fn

    return deco


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def build_policy(name: str, model: nn.Module, budget: Any = None, **kwargs) -> nn.Module:
    """Build the policy registered as `name` for `model`, at `budget` if given."""
    if name not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(available_policies())}")
    policy = _POLICIES[name](model, **kwargs)
    if budget is not None:
        policy.budget = budget
    return policy


def budget_setting(name: str) -> Optional[str]:
    """The setting behind the budget of the policy registered as `name` (None: no budget)."""
    if name not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(available_policies())}")
    return _BUDGETS[name]
