"""The multi-head interpreter (Eq. 1) and the grouped IA-RED² model's execution paths."""

import math

import pytest
import torch

import iared
from iared.evaluation.flops import count_flops
from iared.reduction.interpreter import MultiHeadInterpreter, informative_scores, log_keep_drop


def tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=6, num_heads=2, num_classes=5)
    cfg.update(kw)
    return iared.create_model("vit_custom", **cfg).eval()


def test_eq1_by_hand():
    # Two heads of width 1, identity-like maps: z_h = F_q^h(X_i) * F_k^h(P).
    it = MultiHeadInterpreter(dim=2, num_heads=2, head_dim=1)
    with torch.no_grad():
        it.norm = torch.nn.Identity()  # take X as given for the hand computation
        it.q.weight.copy_(torch.eye(2))
        it.q.bias.zero_()
        it.k.weight.copy_(torch.eye(2))
        it.k.bias.zero_()
        it.policy_token.copy_(torch.tensor([[2.0, -1.0]]))
    X = torch.tensor([[[1.0, 0.0], [0.5, 3.0]]])  # (B=1, N=2, D=2)
    z = it(X)
    assert torch.allclose(z, torch.tensor([[[2.0, -0.0], [1.0, -3.0]]]))
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = [(s(2.0) + s(0.0)) / 2, (s(1.0) + s(-3.0)) / 2]
    assert torch.allclose(informative_scores(z)[0], torch.tensor(expected))


def _eq1_literal(it: MultiHeadInterpreter, X: torch.Tensor) -> torch.Tensor:
    """Eq. 1's per-head logits as written: F_q^h(X_i) . F_k^h(P), head by head."""
    q = it.q(it.norm(X)).view(*X.shape[:2], it.num_heads, it.head_dim)
    k = it.k(it.policy_token).view(it.num_heads, it.head_dim)
    return torch.stack([(q[..., h, :] * k[h]).sum(-1) for h in range(it.num_heads)], dim=-1)


def test_folded_logits_and_gradients_equal_eq1_as_written():
    torch.manual_seed(0)
    it = MultiHeadInterpreter(dim=16, num_heads=4, head_dim=8)
    for p in it.parameters():
        torch.nn.init.normal_(p)
    X = torch.randn(3, 10, 16)
    ref = _eq1_literal(it, X)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in it.parameters()]
    it.zero_grad()
    z = it(X)
    z.sum().backward()
    assert torch.allclose(z, ref, atol=1e-5)
    for p, g in zip(it.parameters(), ref_grads):
        assert torch.allclose(p.grad, g, atol=1e-4)


def test_inference_cache_follows_parameter_updates():
    torch.manual_seed(0)
    it = MultiHeadInterpreter(dim=16, num_heads=4, head_dim=8)
    X = torch.randn(2, 5, 16)
    with torch.inference_mode():
        before = it(X)                                # computes and caches the fold
    opt = torch.optim.SGD(it.parameters(), lr=1.0)
    it(X).pow(2).sum().backward()
    opt.step()                                        # in-place update: versions change
    with torch.inference_mode():
        after = it(X)
    assert not torch.allclose(after, before)
    assert torch.allclose(after, _eq1_literal(it, X).detach(), atol=1e-5)
    it.load_state_dict(MultiHeadInterpreter(dim=16, num_heads=4, head_dim=8).state_dict())
    with torch.inference_mode():
        assert torch.allclose(it(X), _eq1_literal(it, X), atol=1e-5)


def test_log_keep_drop_is_stable_and_exact():
    z = torch.tensor([[0.3, -1.2, 2.0], [100.0, 100.0, 100.0], [-100.0, -100.0, -100.0]])
    lk, ld = log_keep_drop(z)
    assert torch.isfinite(lk).all() and torch.isfinite(ld).all()
    i = informative_scores(z[:1])
    assert torch.allclose(lk[0], i.log()[0])
    assert torch.allclose(ld[0], (1 - i).log()[0])
    assert lk[1].item() == pytest.approx(0.0, abs=1e-6)
    assert ld[2].item() == pytest.approx(0.0, abs=1e-6)


def test_groups_must_divide_depth():
    with pytest.raises(ValueError, match="divide"):
        iared.patch(tiny_vit(), "iared", groups=4)


def test_keep_everything_reproduces_backbone_exactly():
    torch.manual_seed(0)
    m = tiny_vit()
    x = torch.randn(4, 1, 32, 32)
    ref = m(x)
    iared.patch(m, "iared", groups=3, threshold=-1.0)  # every score > -1: nothing dropped
    for execution in ("mask", "compact"):
        assert torch.equal(m(x, execution=execution), ref)
    iared.unpatch(m)
    assert torch.equal(m(x), ref)


@pytest.mark.parametrize("distilled", [False, True])
def test_masked_compact_and_single_image_agree(distilled):
    torch.manual_seed(1)
    m = iared.patch(tiny_vit(distilled=distilled), "iared", groups=3)
    # Spread the scores so images keep very different counts.
    with torch.no_grad():
        for it in m.policy.interpreters:
            it.policy_token.normal_(0, 3.0)
            it.q.weight.normal_(0, 0.5)
    x = torch.randn(6, 1, 32, 32)
    masked, info_m = m(x, return_info=True, execution="mask")
    packed, info_c = m(x, return_info=True, execution="compact")
    assert torch.allclose(masked, packed, atol=1e-5)
    for a, b in zip(info_m.stages, info_c.stages):
        assert torch.equal(a.keep, b.keep)
        assert torch.allclose(a.scores, b.scores, atol=1e-6)
    counts = info_c.stages[-1].keep.sum(1)
    assert len(set(counts.tolist())) > 1, "kept counts should vary per image"
    for i in range(x.shape[0]):
        one = m(x[i:i + 1])
        assert torch.allclose(one[0], packed[i], atol=1e-5)


def test_records_map_to_grid_and_dropped_score_zero_later():
    torch.manual_seed(2)
    m = iared.patch(tiny_vit(), "iared", groups=3)
    with torch.no_grad():
        for it in m.policy.interpreters:
            it.policy_token.normal_(0, 3.0)
    x = torch.randn(3, 1, 32, 32)
    _, info = m(x, return_info=True)
    assert len(info.stages) == 3
    assert [s.block for s in info.stages] == [0, 2, 4]
    for prev, nxt in zip(info.stages, info.stages[1:]):
        assert torch.equal(nxt.entering, prev.keep)
        assert (nxt.scores[~prev.keep] == 0).all()
        assert (nxt.keep <= prev.keep).all()
    first = info.stages[0]
    assert first.entering.all() and first.scores.shape == (3, m.grid_size)
    # Greedy decisions are exactly "score above the threshold".
    assert torch.equal(first.keep, first.scores > 0.5)
    # Tokens entering each block are what the records say (+1 CLS).
    assert torch.equal(info.block_tokens[:, 1], info.stages[0].keep.sum(1) + 1)
    assert torch.equal(info.block_tokens[:, 2], info.stages[1].keep.sum(1) + 1)


def test_threshold_trades_tokens_and_modes():
    torch.manual_seed(3)
    m = iared.patch(tiny_vit(), "iared", groups=3)
    x = torch.randn(4, 1, 32, 32)
    kept = []
    for t in (0.3, 0.5, 0.7):
        m.policy.threshold = t
        _, info = m(x, return_info=True)
        kept.append(info.block_tokens.sum().item())
    assert kept[0] >= kept[1] >= kept[2]
    m.policy.threshold = 0.5
    _, info = m(x, return_info=True, mode=("greedy", "all", "all"))
    assert torch.equal(info.stages[2].keep, info.stages[0].keep)
    torch.manual_seed(0)
    _, s1 = m(x, return_info=True, mode="sample")
    torch.manual_seed(0)
    _, s2 = m(x, return_info=True, mode="sample")
    assert torch.equal(s1.stages[0].keep, s2.stages[0].keep)
    with pytest.raises(ValueError, match="mode"):
        m(x, mode="bogus")


def test_gradients_flow_to_interpreter_logits_in_mask_mode():
    m = iared.patch(tiny_vit().train(), "iared", groups=3)
    x = torch.randn(2, 1, 32, 32)
    logits, info = m(x, return_info=True, mode="sample")
    loss = info.stages[1].extras["head_logits"].sum() + logits.sum()
    loss.backward()
    assert m.policy.interpreters[1].q.weight.grad is not None
    assert m.policy.interpreters[1].q.weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:policy 'iared' as patched drops no token")
def test_interpreter_cost_is_small():
    """Counted, not by formula: DeiT-S with 3 interpreters that keep every token costs DeiT-S plus
    Eq. 1 on each group's 196 patch tokens, and that is under 0.1 % of the backbone (the folded
    Eq. 1 is N·D·H multiply-adds per group, not N·D²)."""
    model = iared.create_model("deit_small_patch16_224").eval()
    x = torch.randn(1, 3, 224, 224)
    plain = count_flops(model, x)
    iared.patch(model, "iared", groups=3, threshold=-1.0)  # every score > -1: the blocks see every token
    extra = count_flops(model, x) - plain
    patches = torch.randn(1, model.grid_size, model.embed_dim)  # what each interpreter scores per image
    eq1 = sum(count_flops(it, patches) for it in model.policy.interpreters)
    assert extra.item() == eq1.item() > 0  # the interpreters' own work, and nothing else
    assert extra.item() / plain.item() < 0.001


def test_a_replaced_interpreter_is_the_one_used():
    # Swapping an interpreter (e.g. for an ablation) must change what inference uses.
    model = iared.patch(tiny_vit(), "iared", groups=3)
    x = torch.randn(2, 1, 32, 32)
    fresh = MultiHeadInterpreter(model.embed_dim, 2, 8, init_keep=0.9)
    with torch.no_grad():
        fresh.k.bias.fill_(-5.0)  # every score far below 0.5: group 2 drops all its tokens
    model.policy.interpreters[1] = fresh
    with torch.inference_mode():
        _, info = model(x, return_info=True)
    assert int(info.stages[1].keep.sum()) == 0
