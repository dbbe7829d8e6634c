"""Weight pruning vs token dropping (IA-RED² Fig. 5): masks, dense-equivalent MACs, curves."""

import pytest
import torch

import iared
from iared.evaluation.pruning import (TradeoffRunner, apply_masks, linear_macs, magnitude_masks, model_linear_macs,
                                      prunable_linears)


def test_magnitude_masks_hand_worked():
    w = {"a": torch.tensor([[1.0, -4.0], [3.0, 0.5]]), "b": torch.tensor([[2.0, -0.1]])}
    g = magnitude_masks(w, 0.5, "global")          # 3 of 6 go: |0.1|, |0.5|, |1|
    assert g["a"].tolist() == [[False, True], [True, False]] and g["b"].tolist() == [[True, False]]
    per = magnitude_masks(w, 0.5, "layer")         # a loses 2 (0.5, 1), b loses 1 (0.1)
    assert per["a"].tolist() == [[False, True], [True, False]] and per["b"].tolist() == [[True, False]]
    assert all(m.all() for m in magnitude_masks(w, 0.0).values())
    with pytest.raises(ValueError):
        magnitude_masks(w, 1.0)


def test_linear_macs_hand_worked():
    shapes = {"x": (4, 3), "y": (3, 2)}
    # 10 tokens * 12 * (1 - 0.25) + 5 tokens * 6 = 90 + 30
    assert linear_macs(shapes, {"x": 10, "y": 5}, {"x": 0.25}) == 120.0


def tiny():
    torch.manual_seed(0)
    m = iared.create_model("vit_custom", img_size=16, patch_size=4, embed_dim=16, depth=3, num_heads=2, num_classes=3)
    return iared.patch(m, policy="iared", groups=3).eval()


def test_model_linear_macs_matches_the_block_formula():
    m = tiny()
    D, n = 16, 17
    per_block = n * (3 * D * D + D * D + 2 * D * 4 * D)   # qkv, proj, fc1, fc2
    assert model_linear_macs(m) == 3 * per_block
    names = list(prunable_linears(m))
    assert len(names) == 12 and names[0] == "blocks.0.attn.qkv"
    half = {n: 0.5 for n in names}
    assert model_linear_macs(m, half, [17, 9, 5]) == pytest.approx(0.5 * per_block * (17 + 9 + 5) / 17)
    sp = apply_masks(m, magnitude_masks({k: v.weight for k, v in prunable_linears(m).items()}, 0.3))
    assert sum(sp[k] * prunable_linears(m)[k].weight.numel() for k in sp) == pytest.approx(
        0.3 * sum(v.weight.numel() for v in prunable_linears(m).values()), abs=1)


def test_tradeoff_curves():
    m = tiny()
    x, y = torch.randn(24, 3, 16, 16), torch.randint(0, 3, (24,))
    r = TradeoffRunner(m, x, y, ratios=[0.0, 0.3, 0.6], thresholds=[0.0, 0.5, 0.52])
    base = r.point(0, 0)
    assert base["reduction"] == pytest.approx(0.0) and base["mean_block_tokens"] == [17.0, 17.0, 17.0]
    prune = r.pruning_curve()
    assert [p["reduction"] for p in prune] == pytest.approx([0.0, 0.3, 0.6], abs=0.01)
    tok = r.token_curve()
    assert all(a["reduction"] <= b["reduction"] + 1e-12 for a, b in zip(tok, tok[1:]))
    path = r.greedy_curve()
    assert len(path) == 5 and path[-1]["ratio"] == 0.6 and path[-1]["threshold"] == 0.52
    for prev, cur in zip(path, path[1:]):
        i, j = r.ratios.index(prev["ratio"]), r.thresholds.index(prev["threshold"])
        options = [r.point(a, b) for a, b in ((i + 1, j), (i, j + 1)) if a < 3 and b < 3]
        assert cur["top1"] == max(o["top1"] for o in options)
    # The model itself is never modified.
    assert m.policy.threshold == 0.5 and all(v.weight.ne(0).all() for v in prunable_linears(m).values())
