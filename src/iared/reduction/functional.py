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
  when every image keeps the same count) there is no padding at all.

Why the two agree: in a pre-norm transformer every operation except attention acts on
each token alone, and in attention a valid query only reads valid keys. So the values of
the kept tokens, and hence the CLS token and the logits, do not depend on whether the
dropped tokens are present-but-masked or absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

Execution = Literal["mask", "compact"]


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
            return replace(tokens, x=x.index_select(1, rows), pos=tokens.pos.index_select(1, rows[P:] - P),
                           valid=None, size=size)
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


# -- packed execution: the linear layers see only real tokens ---------------------------
#
# Compact mode cuts the batch to its longest image, so with very different kept counts
# per image most of the padded slots would still go through qkv, proj and the MLP
# (about 90 % of a ViT block's FLOPs). Padded compact tokens therefore run "packed": the
# valid tokens of the whole batch are gathered into one (T, C) sequence for the
# per-token layers, and only attention, which mixes tokens of one image, goes back to a
# padded layout, in buckets of images of similar length so it does not pay for the
# longest image either (`PackedLayout`). `VisionTransformer.forward_tokens` keeps the
# tokens packed from the first block of a group to its last.
#
# Measured with `benchmarks/execution_options.py` (DeiT-S, batch 64, 2 threads, oneDNN
# kernels, steady allocator; 3 drop stages, image b keeps r_b^(j/3), r_b ~ U[0.15, 0.95]:
# 31..186 patch tokens at the last block; FLOPs ratio 1.48; best of 5 rounds):
#
#                                          img/s   speedup   of the FLOPs limit
#   full (nothing dropped)                 34.6     1.00
#   padded to the longest image            35.3     1.02      0.69
#   packed, attention in 1 padded call     43.7     1.26      0.86
#   packed, 2 attention buckets            45.5     1.31      0.89
#   packed, 4 attention buckets            47.7     1.38      0.93
#   packed, torch.nested SDPA              28.3     0.82      0.55 (CPU fallback)
#
# Keeping a group packed across its blocks instead of gathering and scattering in every
# block gained 1.6 % (1 thread, process CPU time: 26.8 against 26.4 img/s). For a DeiT the
# CPU SDPA kernel's fixed cost per call is small against an image's attention (0.22 ms
# per image of 120 tokens for calls of 1 to 8 images), so 4 buckets cost nothing over 2
# and waste far less padding (attention over the padded layout was 17 %, 37 % and 49 %
# above the per-image cost in the three groups of an IA-RED² forward with 2 buckets); how
# many buckets a batch gets is set below (`MIN_BUCKET_MACS`).
#
# All options give the mask-mode logits to within 3e-6.


# How many buckets. Each attention call has a fixed cost (its q/k/v scatter, the SDPA
# call, the gather back: ~25 us hot, more between the GEMMs of a forward), so one image
# per call is worth it only where an image brings enough attention work. Measured with
# 2 threads, speedup of the reduced model over the unreduced one:
#
#   DeiT-B 384, B = 32 (`execution_options.py`, 4 rounds)   4 buckets 1.46, 16 (this rule) 1.52
#                                          (another run, 2 rounds)   4: 1.44, 8: 1.54, 16: 1.52
#   DeiT-S, B = 64                     4 / 8 / 16 / 32 buckets: 0.96 / 0.97 / 0.95 / 0.96 of the limit
#   DeiT-S, B = 8                      2 / 4 / 8: 0.92 of the limit each
#   DeiT-S, B = 4                      1 / 2 / 4: 0.86 / 0.89 / 0.91 of the limit
#   width 64 (4 heads of 16; the cluttered-fashion model of benchmarks/results, its own
#   IA-RED² keeps), B = 16: 4 buckets of 4 images 1.18-1.24, 16 of one image 1.10-1.14
#   (three runs); B = 64: 4 buckets 1.43, 16 buckets 1.41, this rule (12 then 6) 1.44,
#   medians of 8 interleaved rounds, spread +-0.08.
#
# So: one image per call where an image's attention is large (a DeiT: ~9M multiply-adds
# at 110 tokens), about four where it is small (width 64 at 70 tokens: 0.6M), at most 16
# calls.
MAX_BUCKETS = 16
MIN_BUCKET_MACS = 2.5e6


def packed_index(valid: Tensor) -> Tensor:
    """(T,) positions of the valid tokens in the flattened (B * L) token axis, image-major."""
    return valid.reshape(-1).nonzero().squeeze(1)


@dataclass(frozen=True)
class Bucket:
    """Images of similar length whose attention runs as one padded call.

    Attributes:
        images: (n,) batch indices of the bucket's images.
        length: L_b, the bucket's longest image: its padded attention length.
        tokens: (t0, t1), the bucket's range of the packed token sequence.
        slot: (t1 - t0,) where each of those tokens sits in the bucket's padded
            (n * L_b) layout.
        mask: (n, 1, 1, L_b) key mask for attention, None when nothing is padded.
    """

    images: Tensor
    length: int
    tokens: tuple[int, int]
    slot: Tensor
    mask: Optional[Tensor]


class PackedLayout:
    """Where the valid tokens of a padded (B, L) batch go when packed, and how attention runs.

    Built once per token set (`valid`) and shared by all blocks that see that set: the
    tokens of one IA-RED² group stay packed from its first block to its last, so the
    per-block gathers, scatters and index computations of a naive packed block disappear.

    Packed order is image-major with images sorted by length (longest first) when the
    batch is split into buckets, so every bucket is one contiguous range of the packed
    sequence: its q/k/v are scattered from, and its attention output gathered into, a
    slice (no concatenation, no padded output buffer).

    Args:
        valid: (B, L) bool, the valid tokens.
        width: the tokens' width (the attention's heads x head width), which sizes the
            buckets (see `length_buckets`); None: as for a wide model.
        max_buckets, slack: see `length_buckets`.

    Attributes:
        valid: the (B, L) bool tensor the layout was built for (compared by identity).
        index: (T,) flat (B * L) position of each packed token.
        buckets: one `Bucket` per attention call.
    """

    def __init__(self, valid: Tensor, width: Optional[int] = None, max_buckets: int = MAX_BUCKETS,
                 slack: float = 1.15):
        order, ranges = length_buckets(valid, width, max_buckets, slack)
        B, L = valid.shape
        device = valid.device
        images = order if order is not None else torch.arange(B, device=device)
        self.valid = valid
        buckets, index, t0 = [], [], 0
        for start, stop, Lb in ranges:
            imgs = images[start:stop]
            v = valid.index_select(0, imgs)[:, :Lb] if order is not None else valid[start:stop, :Lb]
            slot = v.reshape(-1).nonzero().squeeze(1)                             # (T_b,)
            index.append(imgs[slot // Lb] * L + slot % Lb)
            t1 = t0 + slot.numel()
            mask = None if bool(v.all()) else v[:, None, None, :]
            buckets.append(Bucket(imgs, Lb, (t0, t1), slot, mask))
            t0 = t1
        self.index = index[0] if len(index) == 1 else torch.cat(index)
        self.buckets = buckets
        self.num_tokens = t0
        self._scratch: dict[tuple, list[Tensor]] = {}

    def matches(self, valid: Optional[Tensor]) -> bool:
        return valid is self.valid

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, D) padded tokens -> (T, D) their valid tokens, in packed order."""
        B, L, D = x.shape
        return x.reshape(B * L, D).index_select(0, self.index)

    def unpack(self, h: Tensor, x: Tensor) -> Tensor:
        """`x` (B, L, D) with its valid tokens replaced by the packed `h` (T, D); a new tensor."""
        B, L, D = x.shape
        return x.reshape(B * L, D).index_copy(0, self.index, h).view(B, L, D)

    def padded_buffers(self, width: int, like: Tensor) -> list[Tensor]:
        """One zero-filled (n_b * L_b, width) buffer per bucket, for q/k/v in padded layout.

        Padded slots must hold finite values (0 * NaN would leak through the masked
        softmax), and only valid slots are ever written, so outside autograd the buffers
        are made once per layout and reused by every block of the group (zero-filling a
        fresh buffer per block was 8 % of a batch-64 DeiT-S forward). With autograd on, a
        buffer saved for backward must not be overwritten: a fresh one each call.
        """
        key = (width, like.dtype, like.device)
        if torch.is_grad_enabled() or key not in self._scratch:
            bufs = [like.new_zeros(b.images.numel() * b.length, width) for b in self.buckets]
            if torch.is_grad_enabled():
                return bufs
            self._scratch[key] = bufs
        return self._scratch[key]


Buckets = tuple[Optional[Tensor], list[tuple[int, int, int]]]


def length_buckets(valid: Tensor, width: Optional[int] = None, max_buckets: int = MAX_BUCKETS,
                   slack: float = 1.15) -> Buckets:
    """Group images of similar length so attention pads each group to its own longest.

    Attention per bucket costs about n_images · L_bucket², plus a fixed cost per call; one
    call over the whole batch costs B · L_max². Images are sorted by extent (last valid
    slot + 1, which equals the count for compacted tokens) and cut into groups of equal
    image count, as many as leave each call at least `MIN_BUCKET_MACS` of attention work
    (one image each for a DeiT, about four for a width-64 model), at most `max_buckets`:
    a bounded Python loop over buckets, never over images. In sorted order every bucket
    is a contiguous slice of the batch, which `PackedLayout` turns into a contiguous
    range of the packed tokens.

    Args:
        valid: (B, L) bool, valid tokens (prefix included).
        width: the tokens' width, for the attention work per image (2 · width · L²
            multiply-adds); None counts every image as enough work for a call of its own.
        max_buckets: upper bound on the number of attention calls.
        slack: one bucket is used when padding to the batch's longest costs at most this
            factor over the sum of per-image attention costs.

    Returns:
        (order, [(start, stop, L_b)]): the batch order that makes buckets contiguous
        (None: keep the batch order) and, per bucket, its slice of that order and the
        sequence length to cut it to.
    """
    B, L = valid.shape
    slot = torch.arange(1, L + 1, device=valid.device)
    extent = (valid * slot).amax(dim=1)                                   # (B,)
    e_max = int(extent.max())
    squares = float((extent.double() ** 2).sum())
    n = 1
    if B > 1 and B * e_max ** 2 > slack * squares:  # padding to the longest would cost too much
        per_call = 1 if width is None else max(1, math.ceil(MIN_BUCKET_MACS * B / (2 * width * squares)))
        n = max(1, min(max_buckets, B // per_call))
    if n == 1:
        return None, [(0, B, e_max)]
    extent, order = torch.sort(extent, descending=True)
    starts = [B * i // n for i in range(n + 1)]
    lengths = extent[starts[:-1]].tolist()
    return order, [(starts[i], starts[i + 1], int(lengths[i])) for i in range(n)]
