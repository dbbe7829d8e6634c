"""Packed execution: the per-token layers of a block see only the real tokens.

Compact mode cuts a batch to its longest image, so with very different kept counts per
image most padded slots would still go through qkv, proj and the MLP (about 90 % of a
ViT block's FLOPs). Padded compact tokens therefore run packed: the valid tokens of the
whole batch are gathered into one (T, C) sequence for the per-token layers, and only
attention, which mixes the tokens of one image, goes back to a padded layout, in buckets
of images of similar length so it does not pay for the longest image either
(`PackedLayout`). `VisionTransformer.forward_tokens` keeps a group's tokens packed from
its first block to its last. Every option gives the mask-mode logits to within 3e-6; the
measurements behind the choices are in docs/performance.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Each attention call has a fixed cost (~25 us), so one image per call only where an
# image brings enough attention work (a DeiT: ~9M multiply-adds), about four for a
# width-64 model, at most 16 calls (docs/performance.md, "Attention buckets").
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
        gather: (n * L_b,) the packed row each slot of the padded layout is read from: its
            token's where valid, else its image's first row. A padded slot is masked as a key
            and its query's output is dropped, so any finite value serves, and taking the
            image's own row keeps a non-finite token from reaching another image. One
            `index_select` builds the padded q/k/v (scattering into a zeroed buffer with
            `index_copy_` was 4-5x slower per row).
        mask: (n, 1, 1, L_b) key mask for attention, None when nothing is padded.
    """

    images: Tensor
    length: int
    tokens: tuple[int, int]
    slot: Tensor
    gather: Tensor
    mask: Optional[Tensor]


class PackedLayout:
    """Where the valid tokens of a padded (B, L) batch go when packed, and how attention runs.

    Built once per token set (`valid`) and shared by all blocks that see that set: the
    tokens of one IA-RED² group stay packed from its first block to its last, so the
    per-block gathers, scatters and index computations of a naive packed block disappear.

    Packed order is image-major with images sorted by length (longest first) when the
    batch is split into buckets, so every bucket is one contiguous range of the packed
    sequence: its padded q/k/v are gathered from, and its attention output gathered into, a
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
            counts = v.sum(dim=1)
            gather = (t0 + counts.cumsum(0) - counts).repeat_interleave(Lb)        # each image's first row
            gather[slot] = torch.arange(t0, t1, device=device)
            mask = None if bool(v.all()) else v[:, None, None, :]
            buckets.append(Bucket(imgs, Lb, (t0, t1), slot, gather, mask))
            t0 = t1
        self.index = index[0] if len(index) == 1 else torch.cat(index)
        self.buckets = buckets
        self.num_tokens = t0

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
