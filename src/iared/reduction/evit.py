"""EViT: token reorganisation (Liang et al., ICLR 2022), parameter-free, plug-in.

"Not All Patches Are What You Need": inside a stage block, after the attention, each
patch token's attentiveness is the CLS token's attention to it, averaged over heads:

    a_j = 1/H sum_h A^h_{CLS, j}

The top ceil(rho * N) patch tokens (the attentive ones) go on; the inattentive rest are
fused into one new token, their sum weighted by that attention,

    x_fused = sum_{j inattentive} a_j x_j,

appended after the kept tokens. The block's FFN (with its residual) then runs on
CLS + kept + fused only, and later blocks see only those tokens.

Choices, checked against the authors' code (youweiliang/evit, `evit.py`):

* Placement: blocks 3, 6, 9 (0-indexed: the paper's 4th, 7th and 10th) of a 12-block
  DeiT; for depth d, `default_stages` gives round(3d/12), round(6d/12), round(9d/12).
* Count: K = ceil(rho * N), N the patch tokens entering the stage (a fused token of an
  earlier stage included), as the authors' `math.ceil(keep_rate * (N - 1))`. The product
  is rounded to 9 decimals before the ceiling, so 0.7 * 10 keeps 7, not 8 (the float
  product is 7.000000000000001; the authors' plain `math.ceil` gives 8 there). K >= 1.
* Fusion weights: a_j as they are, NOT normalised by their sum (the authors'
  `extra_token = sum(non_topk * non_topk_attn)`), so the fused token's scale is the
  attention mass it absorbed. When K = N nothing is fused and no token is added (rho = 1
  leaves the backbone's logits unchanged).
* The fused token is an ordinary token afterwards: at a later stage it is scored and
  kept or fused again like any other (the authors' next stage takes all non-CLS tokens).
* Distilled DeiT: CLS and the distillation token are always kept; only the CLS row
  scores (the authors' code would rank the distillation token as a patch).
* Kept tokens stay in their order, the fused token goes last (the authors order the kept
  ones by attentiveness; a ViT without positional terms after the embedding is
  indifferent to the order).

How the fused token is carried in `Tokens`: a valid patch-region token whose `pos` is
`grid_size`, one past the grid. It counts in `kept_counts` (so in `block_tokens` and the
FLOPs), and `to_grid` sends it to the extra cell it cuts off (no grid patch is its own),
so records and heatmaps show only real patches; -1 keeps meaning padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.kernels import register_native_swap
from ..backbones.tokens import StageRecord, Tokens, apply_keep, attention_mask, with_rows
from ..backbones.vit import Block
from .policy import BlockSwapPolicy, register_policy, shared_setting, stage_blocks

DEFAULT_KEEP_RATE = 0.7  # the paper's main DeiT setting

# -- the math, as pure functions --------------------------------------------------------


def keep_count(n: Union[int, Tensor], keep_rate: float) -> Union[int, Tensor]:
    """K = ceil(rho * n) attentive tokens kept out of n (at least 1 when n >= 1).

    Args:
        n: patch tokens entering the stage, one int or (B,) ints.
        keep_rate: rho in (0, 1].

    Returns:
        K, an int for an int `n`, else (B,) long.
    """
    if isinstance(n, int):
        return min(n, max(1, math.ceil(round(keep_rate * n, 9)))) if n > 0 else 0
    k = torch.ceil((n.double() * keep_rate).round(decimals=9)).long()
    return torch.minimum(k.clamp_min(1), n.long())


def cls_attentiveness(q: Tensor, k: Tensor, scale: float, num_prefix: int,
                      valid: Optional[Tensor] = None) -> Tensor:
    """a_j: the CLS row of the softmax attention, averaged over heads, on the patch tokens.

    Args:
        q, k: (B, H, L, hd) queries and keys of all L tokens (CLS first).
        scale: the attention's logit scale.
        num_prefix: P, the tokens before the patch tokens.
        valid: (B, L) bool, keys that exist (others get attention 0), or None for all.

    Returns:
        (B, L - P) attentiveness of each patch token (the whole row, prefix included,
        sums to 1 per head).
    """
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)            # (B, H, 1, L)
    if valid is not None:
        logits = logits.masked_fill(~attention_mask(valid), float("-inf"))
    return logits.softmax(dim=-1)[:, :, 0, num_prefix:].mean(dim=1)


def evit_keep(cls_attn: Tensor, keep_rate: float, valid: Optional[Tensor] = None) -> Tensor:
    """The attentive tokens: top ceil(rho * n_b) of each image's valid tokens by a_j.

    Args:
        cls_attn: (B, N) attentiveness.
        keep_rate: rho in (0, 1].
        valid: (B, N) bool candidates (n_b = their count), or None for all N.

    Returns:
        (B, N) bool keep mask; ties go to the earlier token.
    """
    B, N = cls_attn.shape
    s = cls_attn.detach()
    if valid is None:
        K = keep_count(N, keep_rate)
        if K == N:
            return torch.ones(B, N, dtype=torch.bool, device=s.device)
        top = s.argsort(dim=1, descending=True, stable=True)[:, :K]  # stable: ties to the lower index
        return torch.zeros(B, N, dtype=torch.bool, device=s.device).scatter_(1, top, True)
    K = keep_count(valid.sum(dim=1), keep_rate)                      # (B,)
    order = s.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=s.device).expand(B, -1))
    return (rank < K[:, None]) & valid


def fuse_inattentive(x: Tensor, cls_attn: Tensor, drop: Tensor) -> Tensor:
    """x_fused = sum_j a_j x_j over the inattentive tokens (weights not normalised).

    Args:
        x: (B, N, C) patch tokens.
        cls_attn: (B, N) attentiveness a_j.
        drop: (B, N) bool, the inattentive tokens to fuse.

    Returns:
        (B, C) the fused token of each image (0 where nothing is dropped).
    """
    w = torch.where(drop, cls_attn, 0.0).to(x.dtype)                  # (B, N)
    return (w[:, None, :] @ x).squeeze(1)


def default_stages(depth: int) -> list[int]:
    """Blocks 3, 6, 9 for a 12-block model; round(f * depth / 12), f = 3, 6, 9, otherwise."""
    return sorted({min(depth - 1, int(math.floor(f * depth / 12 + 0.5))) for f in (3, 6, 9)})


# -- the block --------------------------------------------------------------------------


@dataclass
class EViTSettings:
    """How the EViT blocks of one model reorganise tokens (shared by reference with them)."""

    stages: list[int]                      # block indices (0-based) that keep/fuse inside
    keep_rate: float = DEFAULT_KEEP_RATE   # rho: each stage keeps ceil(rho * N) attentive tokens
    fuse_token: bool = True                # False: drop the inattentive tokens (the paper's ablation)


class EViTBlock(Block):
    """A transformer block that keeps the attentive tokens and fuses the rest after attention.

    Modifications from `iared.backbones.vit.Block`:
      * computes q, k, v itself to read the CLS row of the attention (the output is the
        same `scaled_dot_product_attention` call as `Attention.forward`);
      * after the attention residual, keeps the top ceil(rho * N) patch tokens by CLS
        attentiveness and appends one fused token (`fuse_inattentive`, at `pos` = `evit_grid`);
      * the FFN and its residual run on CLS + kept + fused tokens only.
    """

    evit: EViTSettings  # `evit_index`, `evit_grid` too: see `BlockSwapPolicy`

    def forward(self, tokens: Tokens) -> tuple[Tokens, StageRecord]:  # type: ignore[override]
        cfg = self.evit
        x, P, valid = tokens.x, tokens.num_prefix, tokens.valid
        L = x.shape[1]
        out, q, k = self.attn.attend(self.norm1(x), attention_mask(valid))
        h = x + out                                                      # Block's values, bit for bit
        scores = cls_attentiveness(q, k, self.attn.scale, P, valid)      # (B, N)

        entering = None if valid is None else tokens.patch_valid         # None: all (the record makes it)
        keep = evit_keep(scores, cfg.keep_rate, entering)
        if valid is None:
            n = L - P
            budget = keep_count(n, cfg.keep_rate)
            drops: Optional[Tensor] = None                               # every image drops, or none does
            any_drop = budget < n
        else:
            n = entering.sum(dim=1)                                      # (B,)
            budget = keep_count(n, cfg.keep_rate)
            drops = budget < n
            any_drop = bool(drops.any())

        if not any_drop:  # rho = 1 (or tiny N): the plain block, no fused token
            new = tokens.with_x(h)
        elif cfg.fuse_token:
            drop = ~keep if entering is None else entering & ~keep
            fused = fuse_inattentive(h[:, P:], scores, drop)             # (B, D)
            # One more column, valid where the image fused something: compact mode gathers
            # it after the kept tokens, mask mode leaves it there (so both keep one order).
            keep_ext = F.pad(keep, (0, 1), value=True) if drops is None else torch.cat([keep, drops[:, None]], dim=1)
            ext = replace(tokens, x=torch.cat([h, fused[:, None]], dim=1),
                          pos=F.pad(tokens.pos, (0, 1), value=self.evit_grid),
                          valid=None if valid is None else F.pad(valid, (0, 1), value=True))
            new = apply_keep(ext, keep_ext)
        else:
            new = apply_keep(tokens.with_x(h), keep)
        new = new.with_x(new.x + self.mlp(self.norm2(new.x)))

        return new, self._record(tokens, entering, keep, scores, budget)

    def _record(self, tokens: Tokens, entering: Optional[Tensor], keep: Tensor, scores: Tensor,
                budget: Union[int, Tensor]) -> StageRecord:
        """The stage's record: patch-token scores and keep mask, with the budget K."""
        budgets = torch.full((tokens.x.shape[0],), budget, device=tokens.x.device) if isinstance(budget, int) else budget
        return StageRecord.on_tokens(self.evit_index, tokens, self.evit_grid, entering, keep, scores,
                                     {"budget": budgets})


def _native_evit(block: EViTBlock, native, tokens: Tokens) -> Optional[tuple[Tokens, StageRecord]]:
    """`EViTBlock.forward` by the C++ block (`cpu_kernels(kernels="native")`): the same ops
    from C++ for one image whose tokens are all valid, in compact execution, when the stage
    drops something; None elsewhere."""
    cfg, P = block.evit, tokens.num_prefix
    n = tokens.x.shape[1] - P
    budget = keep_count(n, cfg.keep_rate)
    if tokens.size is not None or budget >= n:
        return None
    x, rows, keep, scores = native.evit(tokens.x, P, budget, cfg.fuse_token)
    # the fused token, appended last, stands for no grid cell
    ext = replace(tokens, pos=F.pad(tokens.pos, (0, 1), value=block.evit_grid)) if cfg.fuse_token else tokens
    return with_rows(ext, x, rows), block._record(tokens, None, keep, scores, budget)


register_native_swap(EViTBlock, _native_evit)


# -- the policy -------------------------------------------------------------------------


class EViTPolicy(BlockSwapPolicy):
    """EViT in the stage blocks (`EViTBlock`): keep the attentive tokens, fuse the rest.

    The budget is keep_rate: ``model.policy.budget = 0.5`` after patching.

    Args:
        depth: the backbone's depth (for the default stages).
        stages: block indices that keep and fuse (default: `default_stages(depth)`).
        keep_rate: rho in (0, 1], the share of a stage's patch tokens kept (default 0.7).
        fuse_token: fuse the inattentive tokens into one (False: just drop them).
    """

    name = "evit"
    block_class = EViTBlock
    key = "evit"
    budget_setting = "keep_rate"

    def __init__(self, depth: int, stages: Optional[Sequence[int]] = None, keep_rate: float = DEFAULT_KEEP_RATE,
                 fuse_token: bool = True):
        super().__init__()
        stages = stage_blocks(default_stages(depth) if stages is None else stages, depth, "EViT")
        self.settings = EViTSettings(stages=stages, keep_rate=_checked_rate(keep_rate), fuse_token=bool(fuse_token))

    keep_rate = shared_setting("keep_rate", lambda value: _checked_rate(value))  # rho, the budget


def _checked_rate(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"keep_rate must be in (0, 1], got {value}")
    return float(value)


@register_policy("evit", EViTPolicy)
def _build(model: nn.Module, **kw) -> EViTPolicy:
    kw.pop("name", None)
    return EViTPolicy(model.config.depth, **kw)
