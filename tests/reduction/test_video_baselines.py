"""Temporal-difference baseline: hand-worked scores and the policy on a JointST model."""

import pytest
import torch

import iared
from iared.reduction.video_baselines import temporal_difference_scores, top_fraction


def test_scores_on_hand_made_clip():
    # T = 3 frames, S = 2 patches, D = 2, ordered n * T + t.
    # patch 0: (1,0) -> (1,0) -> (4,4)   patch 1: (0,0) -> (3,4) -> (3,4)
    per_patch = torch.tensor([
        [[1.0, 0.0], [1.0, 0.0], [4.0, 4.0]],
        [[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]],
    ])                                                        # (S, T, D)
    tokens = per_patch.reshape(1, 6, 2)
    scores = temporal_difference_scores(tokens, num_frames=3)
    # frame 0 vs zero: |(1,0)| = 1, |(0,0)| = 0; then |(0,0)| = 0, |(3,4)| = 5;
    # then |(3,4)| = 5, |(0,0)| = 0.
    expected = torch.tensor([[1.0, 0.0, 5.0, 0.0, 5.0, 0.0]])
    torch.testing.assert_close(scores, expected)


def test_scores_reject_partial_frames():
    with pytest.raises(ValueError, match="frames"):
        temporal_difference_scores(torch.zeros(1, 7, 2), num_frames=3)


def test_top_fraction_keeps_the_largest():
    keep = top_fraction(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), 0.5)
    assert keep.tolist() == [[False, True, False, True]]
    assert top_fraction(torch.rand(2, 10), 0.01).sum(1).tolist() == [1, 1]


def test_policy_keeps_moving_patches_on_jointst():
    torch.manual_seed(0)
    model = iared.create_model("jointst_custom", img_size=8, patch_size=4, in_chans=1, num_frames=4,
                               embed_dim=16, depth=2, num_heads=2, num_classes=3).eval()
    with torch.no_grad():
        model.patch_embed.proj.bias.zero_()  # so blank first-frame patches score exactly 0
    # A bright square moves across the top-left and top-right patches; the rest is static.
    clip = torch.zeros(1, 1, 4, 8, 8)
    clip[0, 0, 0, 0:4, 0:4] = 1.0
    clip[0, 0, 1, 0:4, 4:8] = 1.0
    clip[0, 0, 2, 0:4, 0:4] = 1.0
    clip[0, 0, 3, 0:4, 4:8] = 1.0
    iared.patch(model, "tempdiff", keep_ratio=0.5)
    with torch.no_grad():
        logits, info = model(clip, return_info=True)
    keep = info.stages[0].keep                                     # (1, 16), index n * 4 + t
    expected = torch.zeros(16, dtype=torch.bool)
    expected[0:4] = True    # patch n=0 changes at every frame (appears, leaves, returns, leaves)
    expected[4 + 1:8] = True  # patch n=1 changes at frames 1, 2, 3
    # 7 changing tokens, keep ratio 0.5 of 16 = 8: the 8th is any static (zero-score) token.
    assert keep.sum() == 8 and bool((keep[0] | ~expected).all())
    assert logits.shape == (1, 3) and float(info.keep_ratio) == 0.5
    assert iared.available_policies().count("tempdiff") == 1


def test_policy_needs_a_video_model():
    model = iared.create_model("vit_custom", img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="video"):
        iared.patch(model, "tempdiff", keep_ratio=0.5)
