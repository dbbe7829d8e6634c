"""Random and attention input-drop baselines: keep ratio, seeding, ranking, cost."""

import copy

import torch

import iared
from iared.evaluation.flops import count_flops
from iared.reduction.baselines import cls_attention, keep_count, random_keep


def tiny():
    torch.manual_seed(0)
    m = iared.create_model("vit_custom", img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(8)  # peaked attention, so rankings are not ties
    return m.eval()


def test_keep_count_rounds_half_up():
    assert keep_count(torch.tensor([64, 10, 1, 5]), 0.7).tolist() == [45, 7, 1, 4]


def test_random_keep_ratio_and_seed():
    valid = torch.ones(200, 64, dtype=torch.bool)
    valid[:, :4] = False  # tokens already gone stay gone
    a = random_keep(valid, 0.7, torch.Generator().manual_seed(3))
    b = random_keep(valid, 0.7, torch.Generator().manual_seed(3))
    c = random_keep(valid, 0.7, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.sum(1) == 42).all() and not a[:, :4].any()   # round(0.7 * 60)
    # Uniform: every token is kept about 70 % of the time.
    freq = a[:, 4:].float().mean(0)
    assert (freq - 0.7).abs().max() < 0.15


def test_random_policy_in_model():
    m = tiny()
    iared.patch(m, policy="random", keep_ratio=0.5, seed=1)
    x = torch.randn(8, 3, 32, 32)
    _, info = m(x, return_info=True)
    assert info.stages[0].block == 0 and torch.allclose(info.keep_ratio, torch.full((8,), 0.5))
    first = info.stages[0].keep
    m.policy.reset()
    _, again = m(x, return_info=True)
    assert torch.equal(again.stages[0].keep, first)
    copied = copy.deepcopy(m)  # generators do not deep-copy natively
    assert torch.equal(copied(x), m(x))
    assert torch.equal(info.block_tokens[:, 0], torch.full((8,), 33))


def test_attention_keeps_the_most_attended_tokens():
    m = tiny()
    x = torch.randn(3, 3, 32, 32)
    tokens = m.embed(x)
    scores = cls_attention(m.blocks[0](tokens), m.blocks[1])
    iared.patch(m, policy="attention", keep_ratio=0.25)
    logits, info = m(x, return_info=True)
    rec = info.stages[0]
    assert torch.allclose(rec.scores, scores) and (rec.keep.sum(1) == 16).all()
    top = scores.topk(16, dim=1).indices
    assert torch.equal(rec.keep, torch.zeros_like(rec.keep).scatter_(1, top, True))
    assert torch.allclose(logits, torch.cat([m(x[i:i + 1]) for i in range(3)]), atol=1e-5)
    # Threshold mode: keep tokens with at least the uniform share of attention.
    m.policy.threshold = 1.0
    _, info = m(x, return_info=True)
    assert torch.equal(info.stages[0].keep, scores * 64 >= 1.0)


def test_attention_cost_includes_the_probe_blocks():
    m = tiny()
    x = torch.randn(1, 3, 32, 32)
    rnd = count_flops(iared.patch(copy.deepcopy(m), policy="random", keep_ratio=0.7), x)
    att = count_flops(iared.patch(copy.deepcopy(m), policy="attention", keep_ratio=0.7, block=1), x)
    full = count_flops(m, x)
    # The attention baseline also runs block 0 and block 1's qkv on all 65 tokens.
    assert att.item() > rnd.item() + full.item() / 4 * 0.9
    assert rnd.item() < full.item()
