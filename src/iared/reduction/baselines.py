"""The IA-RED² paper's input-level baselines (Section 4.2): random and attention dropping.

Both drop patch tokens once, right after the position embedding (in front of block 0),
and keep a fixed fraction of them (the paper: a 30 % drop):

* ``random`` keeps a uniformly random subset of round(keep_ratio * N) tokens per image,
  drawn from the policy's own `torch.Generator` (seeded explicitly, so runs repeat).
* ``attention`` ranks tokens by the raw attention of block b's CLS row (mean over heads;
  b = 1, 0-indexed, as the paper's "Block_1"). To get that attention it really runs
  blocks 0..b-1 and block b's qkv on the full token set, so `count_flops` includes that
  cost. Selection: the top round(keep_ratio * N) tokens, or, with `threshold`, tokens
  whose attention is at least `threshold` times the uniform share 1/N.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..backbones.tokens import StageRecord
from .ats import topk_keep
from ..backbones.tokens import Tokens, apply_keep, attention_mask
from .policy import TokenPolicy, register_policy


def keep_count(n_valid: Tensor, keep_ratio: float) -> Tensor:
    """(B,) tokens to keep: round(keep_ratio * n), at least 1, half rounded up."""
    return torch.floor(n_valid.double() * float(keep_ratio) + 0.5).long().clamp_min(1)


def random_keep(valid: Tensor, keep_ratio: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Keep a uniformly random round(keep_ratio * n_b) of each image's valid tokens.

    Args:
        valid: (B, N) bool candidate tokens.
        keep_ratio: fraction to keep, in (0, 1].
        generator: the random source (CPU generator; the draw is moved to `valid`'s device).

    Returns:
        (B, N) bool keep mask.
    """
    noise = torch.rand(valid.shape, generator=generator, dtype=torch.float32).to(valid.device)
    return topk_keep(noise, keep_count(valid.sum(dim=1), keep_ratio), valid)


def cls_attention(tokens: Tokens, block: nn.Module) -> Tensor:
    """(B, N) CLS-row attention of `block` on the patch tokens, averaged over heads."""
    attn, P = block.attn, tokens.num_prefix
    q, k, _ = attn.qkv_heads(block.norm1(tokens.x))                     # (B, H, L, hd)
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)           # (B, H, 1, L)
    mask = attention_mask(tokens.valid)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(dim=-1)[:, :, 0, P:].mean(dim=1)              # (B, N)


class _InputDrop(TokenPolicy, abc.ABC):
    """Shared part: act once, in front of block 0, and record it."""

    budget_setting = "keep_ratio"

    @abc.abstractmethod
    def select(self, tokens: Tokens, model: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
        """(keep (B, N) bool, scores (B, N) or None) for the patch tokens at the input."""

    def acts_before(self, index: int) -> bool:
        return index == 0

    def forward(self, index: int, tokens: Tokens, model: nn.Module, mode: Any = None):
        if not self.acts_before(index):
            return tokens, None
        entering = tokens.patch_valid
        keep, scores = self.select(tokens, model)
        keep = keep & entering
        record = StageRecord.on_tokens(0, tokens, model.grid_size, entering, keep, scores)
        return apply_keep(tokens, keep), record


class RandomDrop(_InputDrop):
    """Random token dropping at the input (keep ratio knob, explicit seed).

    Args:
        keep_ratio: fraction of patch tokens kept (default 0.7: the paper's 30 % drop).
        seed: seed of the policy's generator; `reset()` restarts the sequence.
    """

    def __init__(self, keep_ratio: float = 0.7, seed: int = 0):
        super().__init__()
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.keep_ratio = float(keep_ratio)
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def __deepcopy__(self, memo):
        # torch.Generator cannot be deep-copied; a copy starts its own sequence afresh.
        new = RandomDrop(self.keep_ratio, self.seed)
        new.generator.set_state(self.generator.get_state())
        memo[id(self)] = new
        return new

    def config(self) -> dict[str, Any]:
        return {"name": "random", "keep_ratio": self.keep_ratio, "seed": self.seed}

    def select(self, tokens: Tokens, model: nn.Module):
        return random_keep(tokens.patch_valid, self.keep_ratio, self.generator), None


class AttentionDrop(_InputDrop):
    """Drop at the input by the CLS attention of block `block` (IA-RED²'s attention baseline).

    Args:
        block: the block whose attention ranks the tokens (0-indexed; default 1).
        keep_ratio: fraction kept (default 0.7: the paper's 30 % drop).
        threshold: if given, keep tokens with attention >= threshold / N instead.
    """

    def __init__(self, block: int = 1, keep_ratio: float = 0.7, threshold: Optional[float] = None):
        super().__init__()
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.block = int(block)
        self.keep_ratio = float(keep_ratio)
        self.threshold = None if threshold is None else float(threshold)

    def config(self) -> dict[str, Any]:
        return {"name": "attention", "block": self.block, "keep_ratio": self.keep_ratio, "threshold": self.threshold}

    def select(self, tokens: Tokens, model: nn.Module):
        if not 0 <= self.block < len(model.blocks):
            raise ValueError(f"attention block {self.block} out of range for depth {len(model.blocks)}")
        probe = tokens
        for blk in model.blocks[: self.block]:  # the real cost of this baseline: these blocks run twice
            probe = blk(probe)
        scores = cls_attention(probe, model.blocks[self.block])
        valid = tokens.patch_valid
        if self.threshold is not None:
            keep = scores * valid.sum(dim=1, keepdim=True) >= self.threshold
            return keep & valid, scores
        return topk_keep(scores, keep_count(valid.sum(dim=1), self.keep_ratio), valid), scores


class KeepMask(_InputDrop):
    """Keeps the patch tokens of a given (B, N) mask at the input; set `.keep` per batch
    (the perturbation test of `iared.evaluation.perturbation`)."""

    def __init__(self) -> None:
        super().__init__()
        self.keep: Optional[Tensor] = None

    def config(self) -> dict[str, Any]:
        return {"name": "keep-mask"}

    def select(self, tokens, model: nn.Module):
        if self.keep is None or self.keep.shape != tokens.patch_valid.shape:
            raise ValueError("KeepMask: set .keep to a (B, N) bool mask for this batch first")
        return self.keep.to(tokens.patch_valid.device), None


@register_policy("random", RandomDrop)
def _build_random(model: nn.Module, keep_ratio: float = 0.7, seed: int = 0, **kw) -> RandomDrop:
    kw.pop("name", None)
    if kw:
        raise ValueError(f"unknown settings for random: {', '.join(kw)}")
    return RandomDrop(keep_ratio, seed)


@register_policy("attention", AttentionDrop)
def _build_attention(model: nn.Module, block: int = 1, keep_ratio: float = 0.7,
                     threshold: Optional[float] = None, **kw) -> AttentionDrop:
    kw.pop("name", None)
    if kw:
        raise ValueError(f"unknown settings for attention: {', '.join(kw)}")
    return AttentionDrop(block, keep_ratio, threshold)
