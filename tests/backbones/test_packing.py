"""Packed compact execution equals the masked reference (not timed: speed is benchmarked).

A hand-made keep policy gives very different kept counts per image, including an image
that keeps only its CLS token, at several stages; the compact (packed) logits must equal
the mask-mode logits, and each image run alone must equal its row of the batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from iared.backbones import vit
from iared.backbones.packing import PackedLayout, length_buckets, packed_index
from iared.backbones.tokens import Tokens

from helpers import FixedKeep, tiny_model, uneven_keeps


class FixedKeepRuns(FixedKeep):
    """`FixedKeep` that says where it acts: blocks in between stay packed (`forward_tokens`)."""

    def acts_before(self, index: int) -> bool:
        return index in self.grid_keep


@pytest.fixture
def layouts(monkeypatch) -> list[int]:
    """The bucket count of every `PackedLayout` the backbone builds, in order."""
    built: list[int] = []

    class Recorded(PackedLayout):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            built.append(len(self.buckets))

    monkeypatch.setattr(vit, "PackedLayout", Recorded)
    return built


@pytest.mark.parametrize("buckets", ["sized", "one image each"])
@pytest.mark.parametrize("policy", [FixedKeep, FixedKeepRuns])
@pytest.mark.parametrize("blocks,distilled", [([0], False), ([0, 2, 4], False), ([1, 3], True), ([5], False)])
def test_packed_equals_masked_reference(blocks, distilled, policy, buckets, layouts, monkeypatch):
    import iared.backbones.packing as packing

    model = tiny_model(distilled=distilled)
    B = 6
    model.policy = policy(uneven_keeps(B, model.grid_size, blocks))
    x = torch.randn(B, 3, 32, 32)
    if buckets == "one image each":  # the tiny model's attention would go in one call
        monkeypatch.setattr(packing, "MIN_BUCKET_MACS", 0.0)
    with torch.no_grad():
        ref, info_ref = model(x, execution="mask", return_info=True)
        out, info = model(x, execution="compact", return_info=True)
    assert layouts and (max(layouts) == B if buckets == "one image each" else max(layouts) == 1)
    counts = info.block_tokens[:, -1]
    assert len(set(counts.tolist())) > 2 and int(counts[1]) == model.num_prefix_tokens  # the case we mean
    assert torch.equal(info.block_tokens, info_ref.block_tokens)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # each image alone (no padding at all) equals its row of the batch
    for b in range(B):
        model.policy.rows = torch.tensor([b])
        with torch.no_grad():
            one = model(x[b:b + 1], execution="compact")
        torch.testing.assert_close(one, out[b:b + 1], rtol=1e-5, atol=1e-5)
    model.policy.rows = None


def test_packed_path_is_taken_and_matches_padded_attention():
    """Block.forward_packed on padded compact tokens equals the padded computation."""
    model = tiny_model(depth=1)
    blk = model.blocks[0]
    B, L, D = 5, 9, 32
    x = torch.randn(B, L, D)
    counts = torch.tensor([9, 1, 4, 7, 2])
    valid = torch.arange(L)[None] < counts[:, None]
    tokens = Tokens(x=x, pos=torch.zeros(B, L - 1, dtype=torch.long), valid=valid, num_prefix=1)
    with torch.no_grad():
        packed = blk(tokens).x
        padded = x + blk.attn(blk.norm1(x), valid)
        padded = padded + blk.mlp(blk.norm2(padded))
    torch.testing.assert_close(packed[valid], padded[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[~valid], x[~valid])  # padding untouched


def test_length_buckets_cover_every_image_once():
    valid = torch.arange(20)[None] < torch.tensor([20, 1, 3, 18, 5, 11, 2, 20, 7, 9])[:, None]
    order, ranges = length_buckets(valid, max_buckets=4)
    assert len(ranges) == 4 and sorted(order.tolist()) == list(range(10))
    assert [r[:2] for r in ranges] == [(0, 2), (2, 5), (5, 7), (7, 10)]  # contiguous, cover the batch
    for start, stop, Lb in ranges:
        assert int(valid[order[start:stop]].sum(1).max()) == Lb  # cut to the bucket's own longest
    # equal lengths: one call over the whole batch, in batch order
    assert length_buckets(torch.ones(4, 6, dtype=torch.bool)) == (None, [(0, 4, 6)])
    assert packed_index(valid[:2]).tolist() == list(range(20)) + [20]


def test_length_buckets_leave_each_call_enough_work():
    """One image per call where an image's attention is large, fewer, fuller calls where it
    is small, and never more than MAX_BUCKETS calls."""
    from iared.backbones.packing import MAX_BUCKETS, MIN_BUCKET_MACS

    counts = torch.arange(64) % 40 + 30                                  # 30..69 tokens
    valid = torch.arange(70)[None] < counts[:, None]
    per_image = 2 * 64 * float((counts.double() ** 2).mean())            # width 64: ~0.5M multiply-adds
    _, small = length_buckets(valid, width=64)
    assert len(small) == 64 // math.ceil(MIN_BUCKET_MACS / per_image) < MAX_BUCKETS
    _, wide = length_buckets(valid, width=768)                          # a DeiT-B image is work enough
    _, unsized = length_buckets(valid)
    assert len(wide) == len(unsized) == MAX_BUCKETS
    spread = valid[[0, 15, 30, 39]]                                      # 30, 45, 60, 69 tokens
    assert len(length_buckets(spread, width=768)[1]) == 4                # never more calls than images
    assert length_buckets(spread, width=8) == (None, [(0, 4, 69)])       # too little work: one call


def test_packed_layout_places_every_valid_token_once():
    counts = torch.tensor([20, 1, 3, 18, 5, 11, 2, 20, 7, 9])
    valid = torch.arange(20)[None] < counts[:, None]
    layout = PackedLayout(valid, max_buckets=3)
    assert sorted(layout.index.tolist()) == packed_index(valid).tolist()   # a permutation of the valid slots
    assert layout.num_tokens == int(counts.sum())
    t = 0
    for b in layout.buckets:  # contiguous ranges of the packed sequence, in order
        assert b.tokens[0] == t and b.tokens[1] - b.tokens[0] == int(counts[b.images].sum())
        assert b.length == int(counts[b.images].max())
        assert (b.mask is None) == bool((counts[b.images] == b.length).all())
        t = b.tokens[1]
    x = torch.randn(10, 20, 3)
    h = layout.pack(x)
    torch.testing.assert_close(h, x[valid][torch.argsort(torch.argsort(layout.index))])  # same rows, packed order
    back = layout.unpack(h * 2, x)
    torch.testing.assert_close(back[valid], 2 * x[valid])
    torch.testing.assert_close(back[~valid], x[~valid])


def test_padded_attention_reads_each_images_own_rows():
    """Each slot of a bucket's padded layout reads its own token where valid, else a row of
    its own image (never another image's), so a bucket is built by one gather."""
    counts = torch.tensor([20, 1, 3, 18, 5, 11, 2, 20, 7, 9])
    valid = torch.arange(20)[None] < counts[:, None]
    layout = PackedLayout(valid, max_buckets=3)
    for b in layout.buckets:
        t0, t1 = b.tokens
        assert b.gather.shape == (b.images.numel() * b.length,)
        assert b.gather[b.slot].tolist() == list(range(t0, t1))
        first = t0
        for j, n in enumerate(counts[b.images].tolist()):
            rows = b.gather[j * b.length:(j + 1) * b.length]
            assert bool(((rows >= first) & (rows < first + n)).all())
            first += n


def test_non_finite_image_stays_in_its_own_attention():
    """A NaN in one image's tokens leaves the other images of its attention bucket finite,
    as each image alone would."""
    torch.manual_seed(0)
    attn = vit.Attention(8, num_heads=2).eval()
    counts = torch.tensor([6, 2, 4])
    valid = torch.arange(6)[None] < counts[:, None]
    layout = PackedLayout(valid, max_buckets=1)                  # one padded call for the three images
    x = torch.randn(int(counts.sum()), 8)
    t0 = int(layout.buckets[0].tokens[0])
    first_image = int(layout.buckets[0].images[0])
    x[t0:t0 + int(counts[first_image])] = float("nan")       # the first image of the bucket: every padded
    with torch.no_grad():                                      # slot would read it if rows were shared
        out = attn.forward_packed(x, layout)
    ends = counts[layout.buckets[0].images].cumsum(0)
    assert torch.isnan(out[:ends[0]]).all() and torch.isfinite(out[ends[0]:]).all()


def test_group_runs_share_one_layout_and_match_masked_gradients():
    """Blocks of one group share one `PackedLayout`; with autograd on, the compact gradients
    equal the mask-mode gradients."""
    model = tiny_model()
    B = 6
    model.policy = FixedKeepRuns(uneven_keeps(B, model.grid_size, [0, 3]))
    x = torch.randn(B, 3, 32, 32)
    made = []
    real_init = vit.PackedLayout.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)

    vit.PackedLayout.__init__ = spy
    try:
        with torch.no_grad():
            model(x, execution="compact")
        assert len(made) == 2                                   # one layout per group, not per block
        grads = {}
        for execution in ("mask", "compact"):
            model.zero_grad()
            model(x, execution=execution).square().sum().backward()
            grads[execution] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    finally:
        vit.PackedLayout.__init__ = real_init
    for g_mask, g_compact in zip(grads["mask"], grads["compact"]):
        torch.testing.assert_close(g_compact, g_mask, rtol=1e-4, atol=1e-5)


def test_block_hooks_still_fire_in_packed_runs():
    """A hook on a block sees padded tokens as usual: that block leaves the packed run."""
    model = tiny_model()
    B = 6
    model.policy = FixedKeepRuns(uneven_keeps(B, model.grid_size, [0, 3]))
    x = torch.randn(B, 3, 32, 32)
    seen = []
    handle = model.blocks[4].register_forward_hook(lambda mod, args, out: seen.append(out.x.shape))
    try:
        with torch.no_grad():
            out = model(x, execution="compact")
            ref = model(x, execution="mask")
    finally:
        handle.remove()
    assert len(seen) == 2 and seen[0][0] == B   # compact and mask forwards both called the hooked block
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_equal_counts_compact_without_padding_equals_masked_reference():
    """Every image keeps the same number of (different) tokens: compaction needs no padding."""
    model = tiny_model()
    B, G = 4, model.grid_size
    gen = torch.Generator().manual_seed(1)
    first = torch.rand(B, G, generator=gen).argsort(1).argsort(1) < G // 2    # G/2 random cells each
    second = first & (first.cumsum(1) <= G // 4)                               # G/4 of those each
    model.policy = FixedKeep({0: first, 3: second})
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, execution="mask")
        tokens = model.embed(x, "compact")
        tokens, _ = model.policy(0, tokens, model)
        assert tokens.valid is None and tokens.x.shape[1] == 1 + G // 2   # equal counts: no padding
        out = model(x, execution="compact")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_execution_strategies_are_parameters(layouts, monkeypatch):
    """`execution="padded"` removes tokens without packing; `max_buckets` bounds a packed
    run's attention calls; both give the mask-mode logits."""
    import iared.backbones.packing as packing

    model = tiny_model()
    B = 6
    model.policy = FixedKeepRuns(uneven_keeps(B, model.grid_size, [0, 2, 4]))
    x = torch.randn(B, 3, 32, 32)
    monkeypatch.setattr(packing, "MIN_BUCKET_MACS", 0.0)  # one image per call where allowed
    with torch.no_grad():
        ref, info_ref = model(x, execution="mask", return_info=True)
        padded, info = model(x, execution="padded", return_info=True)
        assert layouts == []  # nothing packed
        assert torch.equal(info.block_tokens, info_ref.block_tokens)
        model.max_buckets = 2
        two = model(x, execution="compact")
    assert layouts and max(layouts) == 2
    torch.testing.assert_close(padded, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="execution must be"):
        model(x, execution="packed")
