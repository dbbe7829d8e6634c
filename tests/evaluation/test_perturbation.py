"""The perturbation test (token removal in heatmap order) as pure functions and on a
hand-made model whose output can be written down."""

import pytest
import torch
from helpers import tiny

from iared.evaluation.perturbation import FRACTIONS, area_under_curve, perturbation_correct, removal_keep


def test_removal_keep_orders_by_relevance_both_ways():
    rel = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0]])
    # 30 % of 10 tokens: the three most relevant (0.9, 0.8, 0.7) go first ...
    assert removal_keep(rel, 0.3, True).tolist() == [[1, 0, 1, 1, 0, 1, 0, 1, 1, 1]]
    # ... or the three least relevant (0.0, 0.1, 0.2).
    assert removal_keep(rel, 0.3, False).tolist() == [[0, 1, 1, 1, 1, 0, 1, 1, 1, 0]]
    assert removal_keep(rel, 0.0, True).all()
    assert not removal_keep(rel, 1.0, False).any()


def test_removal_keep_breaks_ties_by_index_and_rounds_the_count():
    flat = torch.zeros(2, 7)
    assert removal_keep(flat, 0.3, True).tolist() == [[0, 0, 1, 1, 1, 1, 1]] * 2  # round(2.1) = 2, raster order
    with pytest.raises(ValueError, match="fraction"):
        removal_keep(flat, 1.5, True)


def test_area_under_curve_is_the_mean_level():
    assert area_under_curve([0.0, 0.5, 1.0], [80.0, 80.0, 80.0]) == pytest.approx(80.0)
    # a straight fall from 90 to 0 over [0, 0.9]: mean level 45
    assert area_under_curve(FRACTIONS, [90 - 100 * f for f in FRACTIONS]) == pytest.approx(45.0)
    with pytest.raises(ValueError):
        area_under_curve([0.0], [1.0])


def _hand_made():
    """One block whose CLS output is readable by hand: every query-key product is zero, so
    attention is uniform over the tokens present, and the MLP adds nothing."""
    m = tiny(depth=1)
    with torch.no_grad():
        D = m.config.embed_dim
        m.blocks[0].attn.qkv.weight[: 2 * D].zero_()
        if m.blocks[0].attn.qkv.bias is not None:
            m.blocks[0].attn.qkv.bias[: 2 * D].zero_()
        m.blocks[0].mlp.fc2.weight.zero_()
        m.blocks[0].mlp.fc2.bias.zero_()
    return m


def _by_hand(m, image, keep):
    """The hand-made model's logits when only the patch tokens in `keep` (N,) are present."""
    blk, D = m.blocks[0], m.config.embed_dim
    patches = m.patch_embed.proj(image[None]).flatten(2).transpose(1, 2)[0] + m.pos_embed[0, 1:]
    cls = m.cls_token[0, 0] + m.pos_embed[0, 0]
    tokens = torch.cat([cls[None], patches[keep]])
    v = blk.norm1(tokens) @ blk.attn.qkv.weight[2 * D:].T
    if blk.attn.qkv.bias is not None:
        v = v + blk.attn.qkv.bias[2 * D:]
    out = cls + blk.attn.proj(v.mean(dim=0))
    return m.head(m.norm(out))


@torch.no_grad()
def test_removed_tokens_are_the_ones_the_model_no_longer_sees():
    m = _hand_made()
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    rel = torch.rand(3, 64)
    labels = torch.stack([_by_hand(m, images[i], removal_keep(rel[i:i + 1], 0.5, True)[0]).argmax()
                          for i in range(3)])
    correct = perturbation_correct(m, images, labels, rel, fractions=(0.0, 0.5), most_relevant_first=True)
    assert int(correct[1]) == 3       # the labels are the hand-computed predictions at 50 % removed
    assert m.policy is None           # the policy used for the test is removed again
    full = m(images).argmax(-1)
    assert int(correct[0]) == int((full == labels).sum())


def test_refuses_a_model_with_a_policy():
    import iared

    m = iared.patch(tiny(depth=2), policy="random", keep_ratio=0.5)
    with pytest.raises(ValueError, match="bare backbone"):
        perturbation_correct(m, torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, 64))
