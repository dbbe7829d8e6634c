"""FLOPs: FlopCounterMode against the analytic 12·N·D² + 2·N²·D per block."""

import pytest
import torch

import iared
from iared.evaluation.flops import block_macs, count_flops, interpreter_macs, vit_macs


def _tiny(**kw):
    cfg = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=6, num_heads=2, num_classes=5)
    cfg.update(kw)
    return iared.create_model("vit_custom", **cfg).eval()


def test_block_macs_is_the_paper_formula():
    n, d = 197, 384
    assert block_macs(n, d) == 12 * n * d * d + 2 * n * n * d


def test_counter_matches_analytic_for_plain_vit():
    m = _tiny()
    counted = count_flops(m, torch.randn(2, 1, 32, 32))
    n = 64 + 1
    embed = 64 * 32 * (4 * 4 * 1)  # the patch conv: one D x (p*p*C) product per patch
    head = 32 * 5
    assert counted.tolist() == [6 * block_macs(n, 32) + embed + head] * 2


def test_counter_matches_analytic_with_interpreters():
    torch.manual_seed(0)
    # Interpreters start near keep-everything (I ~ 0.9): a threshold there drops some tokens.
    m = iared.patch(_tiny(), "iared", groups=3, threshold=0.9)
    x = torch.randn(3, 1, 32, 32)
    counted = count_flops(m, x)
    _, info = m(x, return_info=True)
    it = m.policy.interpreters[0]
    analytic = vit_macs(info.block_tokens, 32) + 64 * 32 * 16 + 32 * 5
    for s in info.stages:
        n = s.entering.sum(1).double()
        # Folding the policy keys into F_q is an elementwise product + sum, which the
        # counter does not count as matmul work; the analytic formula does (H·d_h·D).
        analytic += interpreter_macs(n, 32, it.num_heads, it.head_dim) - it.num_heads * it.head_dim * 32
    assert torch.allclose(counted, analytic)
    # ... and fewer tokens means fewer FLOPs than the plain model.
    assert (counted < count_flops(iared.unpatch(m), x)).all()


def test_deit_small_is_4_6_gflops():
    m = iared.create_model("deit_small_patch16_224")
    total = 12 * block_macs(197, 384) + 196 * 384 * 768 + 384 * 1000
    assert total / 1e9 == pytest.approx(4.6, abs=0.05)
    assert count_flops(m, torch.randn(1, 3, 224, 224)).item() == total
