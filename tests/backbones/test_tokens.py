"""Token selection: apply_keep in both execution modes, compaction and grid mapping."""

import torch

from iared.backbones.tokens import apply_keep, compact, initial_tokens, to_grid


def _tokens(B=3, N=5, C=2, P=1, execution="compact"):
    x = torch.arange(B * (P + N) * C, dtype=torch.float32).view(B, P + N, C)
    return initial_tokens(x, P, execution)


def test_compact_moves_kept_tokens_to_front_in_order_and_pads():
    t = _tokens()
    keep = torch.tensor([[1, 0, 1, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = apply_keep(t, keep)
    assert out.x.shape == (3, 1 + 5, 2)  # cut to the longest (image 2 keeps all 5)
    assert out.pos[0].tolist() == [0, 2, 4, -1, -1]
    assert out.pos[1].tolist() == [-1] * 5
    assert out.pos[2].tolist() == [0, 1, 2, 3, 4]
    # CLS is always first and always valid; padding slots are invalid.
    assert torch.equal(out.x[:, 0], t.x[:, 0])
    assert out.valid[0].tolist() == [True, True, True, True, False, False]
    assert out.valid[1].tolist() == [True] + [False] * 5
    # Kept tokens carry their own vectors.
    assert torch.equal(out.x[0, 1:4], t.x[0, [1, 3, 5]])
    assert out.kept_counts().tolist() == [3, 0, 5]


def test_compact_without_padding_when_counts_are_equal():
    t = _tokens(B=2)
    keep = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.bool)
    out = apply_keep(t, keep)
    assert out.valid is None
    assert out.x.shape == (2, 3, 2)
    assert out.pos.tolist() == [[0, 2], [1, 4]]


def test_one_image_compaction_by_hand():
    # batch 1 has its own path (rows along dim 1, positions by the same rows)
    t = _tokens(B=1, N=6, C=2, P=2)                      # x rows 0..7: 2 prefix + 6 patches
    first = apply_keep(t, torch.tensor([[0, 1, 1, 0, 1, 1]], dtype=torch.bool))
    assert first.valid is None and first.pos.tolist() == [[1, 2, 4, 5]]
    assert torch.equal(first.x[0], t.x[0, [0, 1, 3, 4, 6, 7]])
    second = apply_keep(first, torch.tensor([[1, 0, 0, 1]], dtype=torch.bool))  # over the 4 left
    assert second.pos.tolist() == [[1, 5]]
    assert torch.equal(second.x[0], t.x[0, [0, 1, 3, 7]])
    assert apply_keep(second, torch.ones(1, 2, dtype=torch.bool)) is second      # nothing dropped
    only_prefix = apply_keep(second, torch.zeros(1, 2, dtype=torch.bool))
    assert only_prefix.pos.shape == (1, 0) and torch.equal(only_prefix.x[0], t.x[0, :2])
    # a non-bool keep mask is taken as bool
    assert apply_keep(t, torch.tensor([[0, 1, 1, 0, 1, 1]])).pos.tolist() == [[1, 2, 4, 5]]


def test_mask_mode_keeps_shape_and_marks_invalid():
    t = _tokens(execution="mask")
    keep = torch.tensor([[1, 0, 1, 0, 1]] * 3, dtype=torch.bool)
    out = apply_keep(t, keep)
    assert out.x.shape == t.x.shape
    assert out.valid[:, 0].all()
    assert out.valid[0, 1:].tolist() == [True, False, True, False, True]


def test_dropped_tokens_stay_dropped():
    for execution in ("mask", "compact"):
        t = _tokens(execution=execution)
        first = apply_keep(t, torch.tensor([[1, 1, 0, 0, 1]] * 3, dtype=torch.bool))
        again = apply_keep(first, torch.ones(first.pos.shape, dtype=torch.bool))
        assert again.kept_counts().tolist() == [3, 3, 3]


def test_to_grid_puts_values_back_and_zeros_dropped():
    t = _tokens(B=2)
    out = compact(t, torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool))
    vals = torch.tensor([[0.7, 0.9, 5.0], [0.3, 9.0, 9.0]])[:, : out.pos.shape[1]]
    grid = to_grid(vals, out, grid_size=5)
    assert torch.allclose(grid, torch.tensor([[0, 0.7, 0, 0.9, 0], [0.3, 0, 0, 0, 0]]))
