"""ToMe: Token Merging (Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster").

Parameter-free, plug-in: in every block, between the attention and the MLP, ToMe merges
the r most similar pairs of tokens, so each block runs its MLP, and the next block all
of its work, on r tokens fewer. The similarity of two tokens is the cosine of their
attention keys averaged over heads. Finding the best pairs among all tokens would cost
N² comparisons and could chain merges; bipartite soft matching instead

  1. splits the tokens alternately into A (even positions) and B (odd positions);
  2. gives each A token an edge to its most similar B token;
  3. keeps the r edges of highest similarity;
  4. merges each of those A tokens into its B token (several may share one);
  5. passes on the unmerged A tokens and all B tokens.

A merged token is the size-weighted average of its parts (sizes start at 1 and add up),
and the attention of later blocks is proportional: log(size) is added to every key's
logit, so a token standing for s patches is attended as s copies of itself would be.
CLS (and DeiT's distillation token) are protected: their similarities are -inf, so they
never merge and nothing merges into them. At most half the unprotected tokens merge in
one block (r is clamped to (L - P) // 2 for L tokens, P protected). Every image merges
the same number of tokens, so a batch needs no padding in compact execution.

How this follows the paper and where it differs from the authors' code (facebookresearch/
ToMe, `tome/merge.py`, `tome/patch/timm.py`; written anew here):

* Tokens keep their original order (prefix first, then the surviving patch tokens in grid
  order); the authors' code concatenates [unmerged A, B], so from the second block on
  the A/B alternation runs over a different order than theirs. Ours keeps `Tokens.pos`
  and mask mode simple; the matching within a block is the same.
* A merged token's `pos` is its B token's: the destination stays where it is.
* Tokens are L2-normalised with `F.normalize` (a zero key gives similarity 0, not NaN).
* Ties in the similarity ranking go to the lower A index (stable sort), so an image gives
  the same merges alone, in a batch, and in mask mode.

The block modification is `ToMeBlock`, a subclass of the backbone's `Block` that
`ToMePolicy.attach` swaps in (class swap, no weight copy), as ToMe patches timm's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.kernels import register_native_swap
from ..backbones.tokens import StageRecord, Tokens, apply_keep, attention_mask, with_rows
from ..backbones.vit import Block
from .policy import BlockSwapPolicy, register_policy, shared_setting

# -- the math, as pure functions --------------------------------------------------------


@dataclass(frozen=True)
class MergePlan:
    """Which tokens merge into which, as indices into the token axis (prefix included).

    Attributes:
        src: (B, r) tokens of set A merged away, most similar first.
        dst: (B, r) the set-B token each one merges into (several may share one).
        similarity: (B, r) cosine similarity of each merged pair.
    """

    src: Tensor
    dst: Tensor
    similarity: Tensor

    @property
    def r(self) -> int:
        return self.src.shape[1]


def merges(r: int, n: int, protected: int) -> int:
    """The merges a block does for `r` asked on `n` tokens of which `protected` are never merged:
    at most half the unprotected ones (each merge takes one A and one B token), at least 0."""
    return max(0, min(int(r), (n - protected) // 2))


def bipartite_soft_matching(metric: Tensor, r: int, protected: int = 1,
                            valid: Optional[Tensor] = None) -> MergePlan:
    """ToMe's matching: the r most similar (A, B) pairs, A = even positions, B = odd.

    Args:
        metric: (B, L, C) per-token features to compare (ToMe: keys averaged over heads).
        r: merges wanted per image; clamped to (L' - protected) // 2 for L' valid tokens.
        protected: the first `protected` tokens (CLS, distillation) never merge and nothing
            merges into them.
        valid: (B, L) bool, the tokens taking part (mask mode: merged-away tokens are
            still there, invalid); they alternate by their rank among the valid tokens, as
            they would with the others removed. Every image must have the same count.
            None: all.

    Returns:
        The plan, with indices into `metric`'s token axis.
    """
    B, L, C = metric.shape
    metric = metric.detach()  # indices only: no graph through the matching
    idx = None
    if valid is not None:
        counts = valid.sum(dim=1)
        n = int(counts[0]) if B else 0
        if bool((counts != n).any()):
            raise ValueError("ToMe needs the same number of valid tokens in every image")
        idx = valid.nonzero()[:, 1].view(B, n)                                  # (B, n) positions, in order
        metric = metric.gather(1, idx[..., None].expand(-1, -1, C))
    n = metric.shape[1]
    r = merges(r, n, protected)
    if r == 0:
        empty = torch.zeros(B, 0, dtype=torch.long, device=metric.device)
        return MergePlan(empty, empty, metric.new_zeros(B, 0))
    metric = F.normalize(metric, dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)                                              # (B, |A|, |B|) cosines
    scores[:, :(protected + 1) // 2] = float("-inf")  # protected A tokens: positions 0, 2, .. < P
    scores[:, :, :protected // 2] = float("-inf")     # protected B tokens: positions 1, 3, .. < P
    best, match = scores.max(dim=-1)                                            # (B, |A|)
    edges = best.argsort(dim=-1, descending=True, stable=True)[:, :r]           # (B, r) A indices
    src, dst = 2 * edges, 2 * match.gather(1, edges) + 1
    if idx is not None:
        src, dst = idx.gather(1, src), idx.gather(1, dst)
    return MergePlan(src, dst, best.gather(1, edges))


def merge_weighted(x: Tensor, size: Tensor, plan: MergePlan) -> tuple[Tensor, Tensor]:
    """Merge each `plan.src` token into its `plan.dst` token by size-weighted average.

    A destination d becomes (s_d x_d + sum_i s_i x_i) / (s_d + sum_i s_i) over the tokens
    i merged into it, with size s_d + sum_i s_i. Every other token keeps its value and size
    (merged-away tokens too: the caller drops them).

    Args:
        x: (B, L, C) tokens.
        size: (B, L) how many input tokens each stands for.
        plan: from `bipartite_soft_matching` on the same token axis.

    Returns:
        (x, size) of the same shapes.
    """
    C = x.shape[-1]
    src = plan.src[..., None].expand(-1, -1, C)
    dst = plan.dst[..., None].expand(-1, -1, C)
    weighted = x * size[..., None]                                              # (B, L, C)
    summed = weighted.scatter_add(1, dst, weighted.gather(1, src))
    total = size.scatter_add(1, plan.dst, size.gather(1, plan.src))             # (B, L)
    merged = summed.gather(1, dst) / total.gather(1, plan.dst)[..., None]       # (B, r, C)
    # Only destinations are rewritten: other tokens stay bit-exact (not x * s / s).
    return x.scatter(1, dst, merged.to(x.dtype)), total


def merge_owner(owner: Tensor, pos: Tensor, plan: MergePlan, num_prefix: int) -> Tensor:
    """Follow a merge on the grid: cells carried by a merged-away token go to its destination.

    Args:
        owner: (B, G) long, the `pos` of the token carrying each grid cell.
        pos: (B, N) grid index of each patch token before the merge.
        plan: the merge, over prefix + patch tokens (prefix tokens never merge).
        num_prefix: P.

    Returns:
        (B, G) the owners after the merge. (A destination is never merged away in the same
        block, so one step follows every chain.)
    """
    B, G = owner.shape
    src_pos = pos.gather(1, plan.src - num_prefix)
    dst_pos = pos.gather(1, plan.dst - num_prefix)
    into = torch.arange(G, device=owner.device).expand(B, G).scatter(1, src_pos, dst_pos)  # cell -> its new carrier
    return into.gather(1, owner)


def source_matrix(owner: Tensor, pos: Tensor) -> Tensor:
    """(B, N, G) bool: which grid cells each patch token covers (ToMe's "source").

    Args:
        owner: (B, G) carrier of each cell (see `merge_owner`).
        pos: (B, N) grid index of each patch token. Dropped, merged-away and padding
            tokens carry no cell (their pos is no cell's owner, or -1), so their rows are
            all False.
    """
    return pos[:, :, None] == owner[:, None, :]


def proportional_bias(size: Optional[Tensor], valid: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Attention mask with proportional attention: log(size) on every key's logit.

    Args:
        size: (B, L) token sizes, or None (all 1: no bias).
        valid: (B, L) bool, keys that exist, or None.
        dtype: the attention's dtype (a float mask must match the queries').

    Returns:
        (B, 1, 1, L) float bias (-inf for invalid keys), the plain bool key mask when
        `size` is None, or None.
    """
    if size is None:
        return attention_mask(valid)
    bias = size.log()
    if valid is not None:
        bias = bias.masked_fill(~valid, float("-inf"))
    return bias.to(dtype)[:, None, None, :]


# -- the block --------------------------------------------------------------------------


@dataclass
class ToMeSettings:
    """How the ToMe blocks of one model merge (shared by reference with those blocks)."""

    r: int = 8                   # tokens merged in every block (clamped to half the unprotected ones)
    prop_attn: bool = True       # proportional attention: log(size) added to every key's logit
    trace_source: bool = False   # carry which grid cells each token covers (records' extras; (B, N, G) memory)


def _check_r(r: Any) -> int:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or r != int(r) or r < 0:
        raise ValueError(f"r must be a non-negative integer, got {r}")
    return int(r)


class ToMeBlock(Block):
    """A transformer block that merges r token pairs between its attention and its MLP.

    Modifications from `iared.backbones.vit.Block`:
      * proportional attention: log(size) of each key is added to the attention logits
        (`proportional_bias`); with every size 1 (before any merge) it is the plain
        attention;
      * after the attention residual, bipartite soft matching on the keys averaged over
        heads picks r pairs, and each A token is merged into its B match by size-weighted
        average (`bipartite_soft_matching`, `merge_weighted`), sizes carried in
        `Tokens.size`;
      * the merged-away tokens are removed (compact) or marked invalid (mask) by
        `apply_keep`, and the MLP runs on what remains;
      * with `trace_source`, `Tokens.owner` follows the merges (`merge_owner`).
    """

    tome: ToMeSettings  # `tome_index`, `tome_grid` too: see `BlockSwapPolicy`

    def forward(self, tokens: Tokens) -> tuple[Tokens, StageRecord]:  # type: ignore[override]
        x, P, valid = tokens.x, tokens.num_prefix, tokens.valid
        B, L, _ = x.shape
        cfg = self.tome
        mask = proportional_bias(tokens.size if cfg.prop_attn else None, valid, x.dtype)
        out, _, k = self.attn.attend(self.norm1(x), mask)                        # k: (B, H, L, hd)
        x = x + out

        plan = bipartite_soft_matching(k.mean(dim=1), cfg.r, P, valid)
        entering = None if valid is None else tokens.patch_valid                # None: all (the record makes it)
        owner = tokens.owner
        if cfg.trace_source and owner is None:
            owner = torch.arange(self.tome_grid, device=x.device).expand(B, -1)
        if plan.r == 0:
            new, keep = replace(tokens, x=x, owner=owner), entering
        else:
            size = tokens.size if tokens.size is not None else x.new_ones(B, L, dtype=torch.float32)
            x, size = merge_weighted(x, size, plan)
            keep = torch.ones(B, L - P, dtype=torch.bool, device=x.device).scatter_(1, plan.src - P, False)
            keep = keep if entering is None else keep & entering
            if owner is not None:
                owner = merge_owner(owner, tokens.pos, plan, P)
            new = apply_keep(replace(tokens, x=x, size=size, owner=owner), keep)
        new = new.with_x(new.x + self.mlp(self.norm2(new.x)))

        if keep is None:
            keep = torch.ones(B, L - P, dtype=torch.bool, device=x.device)
        return new, self._record(tokens, entering, keep, plan.r, owner, new)

    def _record(self, tokens: Tokens, entering: Optional[Tensor], keep: Tensor, r: int,
                owner: Optional[Tensor] = None, new: Optional[Tokens] = None) -> StageRecord:
        """The stage's record: the keep mask (merged-away tokens False) and r, with the grid
        cells each leaving token covers when the source is traced."""
        extras = {"r": torch.full((tokens.x.shape[0],), r, device=tokens.x.device)}
        if owner is not None:
            extras["owner"] = owner                             # (B, G) pos of the token covering each cell
            extras["source"] = source_matrix(owner, new.pos)    # (B, N', G) over the tokens leaving the block
        return StageRecord.on_tokens(self.tome_index, tokens, self.tome_grid, entering, keep, None, extras)


def _native_tome(block: ToMeBlock, native, tokens: Tokens) -> Optional[tuple[Tokens, StageRecord]]:
    """`ToMeBlock.forward` by the C++ block (`cpu_kernels(kernels="native")`): the same ops
    from C++ for one image whose tokens are all valid, in compact execution, when the block
    merges and no source is traced; None elsewhere."""
    cfg, P = block.tome, tokens.num_prefix
    r = merges(cfg.r, tokens.x.shape[1], P)
    if cfg.trace_source or tokens.owner is not None or r == 0:
        return None
    x, rows, size, keep = native.tome(tokens.x, P, r, tokens.size, cfg.prop_attn)
    return with_rows(tokens, x, rows, size), block._record(tokens, None, keep, r)


register_native_swap(ToMeBlock, _native_tome)


# -- the policy -------------------------------------------------------------------------


class ToMePolicy(BlockSwapPolicy):
    """Attaches ToMe to every block of a ViT; the work happens in the swapped-in blocks.

    As with ``tome.patch.timm(model); model.r = 16``, change the budget after patching
    with ``model.policy.budget = 16`` (r; the blocks share the settings object).

    Each block's `StageRecord`: `keep` marks the grid cells whose token survived the block
    (unmerged, or a merge destination), `entering` those alive before it, `scores` is
    None, and `extras` holds "r" (B,) (the merges done, after clamping) and, with
    `trace_source`, "owner" (B, G) (the grid cell of the token covering each cell) and
    "source" (B, N', G) (which cells each token leaving the block covers, rows in the
    order of the tokens).

    Args:
        r: tokens merged in every block (default 8); 0 gives the backbone's logits.
        prop_attn: proportional attention (ToMe's default for off-the-shelf models).
        trace_source: carry the merge history on the grid (for `iared interpret`).
    """

    name = "tome"
    block_class = ToMeBlock
    key = "tome"
    budget_setting = "r"

    def __init__(self, r: int = 8, prop_attn: bool = True, trace_source: bool = False):
        super().__init__()
        self.settings = ToMeSettings(r=_check_r(r), prop_attn=bool(prop_attn), trace_source=bool(trace_source))

    r = shared_setting("r", lambda value: _check_r(value))
    trace_source = shared_setting("trace_source", bool)

    def attach(self, model: nn.Module) -> None:
        """Swap the class of every block to `ToMeBlock` (see `BlockSwapPolicy`)."""
        self.swap_blocks(model, range(len(model.blocks)))


@register_policy("tome", ToMePolicy)
def _build(model: nn.Module, **kw) -> ToMePolicy:
    kw.pop("name", None)
    return ToMePolicy(**kw)
