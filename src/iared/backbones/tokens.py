"""Token selection as pure functions of tensors.

Every reduction method in iared ends in the same step: given the current tokens and a
per-image decision of which patch tokens to keep, produce the next tokens. This module
holds that step (`apply_keep`) and the small value type that carries tokens between
blocks (`Tokens`). The shape of the idea follows timm's `patch_dropout_forward`: prefix
tokens (CLS, distillation) are set aside and always kept, patch tokens are chosen, then
gathered.

Two execution modes give the same logits for the kept tokens:

* ``"mask"``: nothing is removed. Dropped tokens stay in the tensor but are marked
  invalid, and attention never lets a valid token look at an invalid one. Shapes stay
  fixed, which is what training (Bernoulli samples, gradients) needs.
* ``"compact"``: dropped tokens are really removed. Each image's kept tokens move to the
  front in their original order and the batch is cut to its largest kept count; the
  positions past an image's own count are padding, masked as keys. With one image (or
  when every image keeps the same count) there is no padding at all. The backbone runs
  padded compact tokens packed (`iared.backbones.packing`); ``"padded"`` is the same
  removal with every layer run on the padded tensor instead, the reference packing is
  measured against.

Why the two agree: in a pre-norm transformer every operation except attention acts on
each token alone, and in attention a valid query only reads valid keys. So the values of
the kept tokens, and hence the CLS token and the logits, do not depend on whether the
dropped tokens are present-but-masked or absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

Execution = Literal["mask", "compact", "padded"]


@dataclass(frozen=True)
class Tokens:
    """The token sequence flowing through a ViT, with where each patch token came from.

    Attributes:
        x: (B, P + N, C) prefix tokens first (CLS, distillation), then patch tokens.
        pos: (B, N) original index of each patch token on the full patch grid, so any
            score can be mapped back to the grid (-1 marks padding in compact mode; G, one
            past the grid, a token made by a policy that stands for no single cell, as
            EViT's fused token: `to_grid` leaves it out).
        valid: (B, P + N) bool, False for dropped (mask mode) or padding (compact mode)
            tokens; None when every token is valid (the fast case: no masking at all).
        num_prefix: P, the number of prefix tokens, never scored and never dropped.
        execution: how dropping is carried out, see the module docstring.
        size: (B, P + N) float, how many input tokens each token stands for once tokens
            are merged (ToMe); None: one each (no merging has happened).
        owner: (B, G) long, for each cell of the full patch grid the `pos` of the token
            that now carries its content (merging methods, when asked to trace it); None:
            not traced. Indexed by grid cell, so dropping tokens never has to move it.
    """

    x: Tensor
    pos: Tensor
    valid: Optional[Tensor]
    num_prefix: int
    execution: Execution = "compact"
    size: Optional[Tensor] = None
    owner: Optional[Tensor] = None

    @property
    def patch_valid(self) -> Tensor:
        """(B, N) bool: which patch tokens are real (not dropped, not padding)."""
        B, N = self.pos.shape
        if self.valid is None:
            return torch.ones(B, N, dtype=torch.bool, device=self.x.device)
        return self.valid[:, self.num_prefix:]

    def kept_counts(self) -> Tensor:
        """(B,) number of patch tokens still alive per image."""
        if self.valid is None:
            B, N = self.pos.shape
            return torch.full((B,), N, dtype=torch.long, device=self.x.device)
        return self.patch_valid.sum(dim=1)

    def with_x(self, x: Tensor) -> "Tokens":
        return replace(self, x=x)


def initial_tokens(x: Tensor, num_prefix: int, execution: Execution = "compact") -> Tokens:
    """Wrap freshly embedded tokens (B, P + N, C): every patch at its own grid index."""
    B, L, _ = x.shape
    pos = torch.arange(L - num_prefix, device=x.device).expand(B, -1)
    return Tokens(x=x, pos=pos, valid=None, num_prefix=num_prefix, execution=execution)


def attention_mask(valid: Optional[Tensor]) -> Optional[Tensor]:
    """Key mask for `scaled_dot_product_attention`: (B, 1, 1, L) bool, or None.

    Only keys are masked. A padded or dropped query still computes a row (over the
    valid keys, which always include CLS, so the softmax never sees an empty row); that
    row is never read by a valid token.
    """
    if valid is None:
        return None
    return valid[:, None, None, :]


def apply_keep(tokens: Tokens, keep: Tensor) -> Tokens:
    """Drop the patch tokens whose `keep` entry is False.

    Args:
        tokens: the current tokens.
        keep: (B, N) bool over the current patch tokens. Tokens that are already invalid
            stay dropped whatever `keep` says.

    Returns:
        The next tokens, in `tokens.execution` mode (see the module docstring).
    """
    P = tokens.num_prefix
    if keep.dtype != torch.bool:  # (a dispatch saved when it is already bool: see `compact`)
        keep = keep.bool()
    if tokens.valid is not None:
        keep = keep & tokens.patch_valid
    if tokens.execution == "mask":
        prefix = torch.ones(keep.shape[0], P, dtype=torch.bool, device=keep.device)
        return replace(tokens, valid=torch.cat([prefix, keep], dim=1))
    return compact(tokens, keep)


def _prefix_or_kept_rows(keep: Tensor, P: int) -> Tensor:
    """Flat (B * (P + N)) row indices of the prefix tokens and the kept patch tokens, in order."""
    return F.pad(keep, (P, 0), value=True).reshape(-1).nonzero().squeeze(1)


def compact(tokens: Tokens, keep: Tensor) -> Tokens:
    """Really remove dropped tokens: kept tokens to the front, batch cut to the longest.

    Args:
        tokens: the current tokens.
        keep: (B, N) bool, already restricted to valid tokens.

    Returns:
        Tokens of length P + max_b(count_b); `valid` is None when nothing is padded.
    """
    x, P = tokens.x, tokens.num_prefix
    B, N = keep.shape
    L, C = x.shape[1], x.shape[-1]                                                     # L = P + N
    if B == 1:  # one image: never padding, and the rows' count is the kept count (no sum, no sync of its own)
        rows = _prefix_or_kept_rows(keep, P)                                          # (P + K,)
        k_min = k_max = rows.numel() - P
        if k_max < N:
            # Every batch-1 compaction ends here, in as few operations as it takes: between
            # two blocks each small one costs ~20-60 us, several times its cost in a loop.
            # Rows of x and positions of pos are taken along dim 1 directly (no flattening
            # views), the positions by the same rows (no masked_select, which counts the
            # mask again and syncs on it).
            size = None if tokens.size is None else tokens.size.index_select(1, rows)
            return with_rows(tokens, x.index_select(1, rows), rows, size)
    else:
        counts = keep.sum(dim=1)
        k_min, k_max = (int(v) for v in torch.aminmax(counts)) if B else (0, 0)
    same_count = k_min == k_max
    if k_max == N and same_count:
        return replace(tokens, valid=None) if tokens.valid is not None and bool(tokens.valid.all()) else tokens
    # The kept tokens are gathered as whole rows (C contiguous floats) of the flattened
    # batch, prefix included, by one `index_select` (a per-element `gather` with an
    # expanded index and a `cat` after it were two thirds of the policy's time at batch 64).
    if same_count:
        # Row-major positions of "prefix or kept" are exactly those rows, already in order.
        rows = _prefix_or_kept_rows(keep, P)                                            # (B * (P + K),)
        new_x = x.reshape(B * L, C).index_select(0, rows).view(B, P + k_max, C)
        pos = tokens.pos.masked_select(keep).view(B, k_max)                           # (B, K)
        return replace(tokens, x=new_x, pos=pos, valid=None, size=_take_rows(tokens.size, rows, P + k_max))
    # a stable sort on "not kept" moves kept tokens to the front in their order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k_max]  # (B, K)
    prefix_rows = torch.arange(P, device=x.device).expand(B, P)
    rows = torch.cat([prefix_rows, order + P], dim=1) + L * torch.arange(B, device=x.device)[:, None]
    new_x = x.reshape(B * L, C).index_select(0, rows.reshape(-1)).view(B, P + k_max, C)
    slot_valid = torch.arange(k_max, device=x.device)[None, :] < counts[:, None]       # (B, K)
    pos = tokens.pos.gather(1, order).masked_fill(~slot_valid, -1)
    prefix = torch.ones(B, P, dtype=torch.bool, device=x.device)
    return replace(tokens, x=new_x, pos=pos, valid=torch.cat([prefix, slot_valid], dim=1),
                   size=_take_rows(tokens.size, rows.reshape(-1), P + k_max))


def with_rows(tokens: Tokens, x: Tensor, rows: Tensor, size: Optional[Tensor] = None) -> Tokens:
    """One image's tokens cut to `rows` (its prefix rows, then the kept patch rows, in order).

    Args:
        tokens: the tokens before the cut, batch 1.
        x: (1, len(rows), C) the rows kept (what a stage computed for them).
        rows: (len(rows),) their indices in `tokens.x`.
        size: (1, len(rows)) their sizes, or None (every token stands for one).
    """
    P = tokens.num_prefix
    return replace(tokens, x=x, pos=tokens.pos.index_select(1, rows[P:] - P), valid=None, size=size)


def _take_rows(size: Optional[Tensor], rows: Tensor, length: int) -> Optional[Tensor]:
    """The per-token sizes (B, L) at the flat (B * L) `rows` that `compact` keeps, as (B, length)."""
    if size is None:
        return None
    return size.reshape(-1).index_select(0, rows).view(size.shape[0], length)


def to_grid(values: Tensor, tokens: Tokens, grid_size: int, fill: float = 0.0) -> Tensor:
    """Scatter per-token values (B, N, *) back to the full patch grid (B, grid_size, *).

    Invalid tokens (dropped or padding) and grid cells with no token get `fill`; this is
    how a token dropped in an earlier group scores 0 on a later group's heatmap.
    """
    B, N = values.shape[:2]
    trailing = tuple(values.shape[2:])
    # Invalid tokens are sent to an extra cell past the grid, then cut off: one scatter,
    # no data-dependent shapes (no nonzero, so no host sync on a GPU).
    index = torch.where(tokens.patch_valid, tokens.pos, grid_size)                      # (B, N)
    out = values.new_full((B, grid_size + 1) + trailing, fill)
    index = index.view(B, N, *([1] * len(trailing))).expand(B, N, *trailing)
    return out.scatter(1, index, values)[:, :grid_size]


@dataclass
class StageRecord:
    """What a token policy did at one stage, on the full patch grid (a value, not state).

    Attributes:
        block: index of the block the stage sits in front of (or inside, for ATS).
        entering: (B, G) bool, patch tokens alive when the stage was reached.
        keep: (B, G) bool, patch tokens alive after it.
        scores: (B, G) float informative scores (0 for tokens dropped earlier), or None
            for policies without scores.
        extras: policy-specific tensors (e.g. per-head logits and samples for REINFORCE).
    """

    block: int
    entering: Tensor
    keep: Tensor
    scores: Optional[Tensor] = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def keep_ratio(self) -> Tensor:
        """(B,) fraction of the full patch grid still alive after this stage."""
        return self.keep.float().mean(dim=1)

    @classmethod
    def on_tokens(cls, block: int, tokens: Tokens, grid_size: int, entering: Optional[Tensor], keep: Tensor,
                  scores: Optional[Tensor] = None, extras: Optional[dict[str, Tensor]] = None) -> "StageRecord":
        """A record from per-token values (B, N) of `tokens`, put on the grid when first read.

        Mapping to the grid (`to_grid`) is a few small ops per field; an inference
        forward that returns no info never reads them, and at batch 1 those ops are a
        measurable share of a reduced ViT's time. `entering=None` means the tokens'
        `patch_valid`, also made only when read.
        """
        return _TokenStageRecord(block, tokens, grid_size, entering, keep, scores, extras or {})


class _TokenStageRecord(StageRecord):
    """`StageRecord.on_tokens`: `entering`, `keep`, `scores` made on first access, then kept."""

    def __init__(self, block, tokens, grid_size, entering, keep, scores, extras):
        self.block, self.extras = block, extras
        self._tokens, self._grid_size = tokens, grid_size
        self._values = {"entering": entering, "keep": keep, "scores": scores}
        self._grids: dict[str, Optional[Tensor]] = {}

    def _grid(self, name: str) -> Optional[Tensor]:
        if name not in self._grids:
            v = self._values[name]
            if v is None and name == "entering":
                v = self._tokens.patch_valid
            fill = False if v is not None and v.dtype == torch.bool else 0.0
            self._grids[name] = None if v is None else to_grid(v, self._tokens, self._grid_size, fill=fill)
        return self._grids[name]

    entering = property(lambda self: self._grid("entering"))
    keep = property(lambda self: self._grid("keep"))
    scores = property(lambda self: self._grid("scores"))


@dataclass
class ReductionInfo:
    """Returned by `forward(..., return_info=True)`: per-stage records and token counts."""

    grid_size: int
    stages: list[StageRecord]
    block_tokens: Tensor  # (B, depth) valid tokens (prefix included) entering each block

    @property
    def keep_ratio(self) -> Tensor:
        """(B,) fraction of patch tokens that reach the last block."""
        if not self.stages:
            return torch.ones(self.block_tokens.shape[0])
        return self.stages[-1].keep_ratio
