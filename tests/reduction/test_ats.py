"""ATS: the sampler against hand-worked values, and the patched block against the plain one."""

import copy

import pytest
import torch

import iared
from iared.backbones.vit import Block
from iared.reduction.ats import (ATSBlock, budget_k, default_stages, inverse_transform_sample, sampling_quantiles,
                                 significance_scores, topk_keep)

from helpers import assert_block_swap_round_trip, peaked, tiny


# -- the math ---------------------------------------------------------------------------

def test_quantiles_hand_worked():
    q, real = sampling_quantiles(torch.tensor([4, 2]))
    assert torch.allclose(q[0], torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64))
    assert torch.allclose(q[1, :2], torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert real.tolist() == [[True] * 4, [True, True, False, False]]


def test_sampler_hand_worked():
    # CDF = 0.1, 0.7, 1.0; quantiles 1/8, 3/8, 5/8, 7/8 fall in tokens 1, 1, 1, 2.
    keep = inverse_transform_sample(torch.tensor([[0.1, 0.6, 0.3]]), 4)
    assert keep.tolist() == [[False, True, True]]
    # Uniform scores, K = 2: CDF .25 .5 .75 1; quantiles .25 -> token 0 (its interval's end), .75 -> token 2.
    keep = inverse_transform_sample(torch.full((1, 4), 0.25), 2)
    assert keep.tolist() == [[True, False, True, False]]


def test_sampler_uniform_with_k_equal_n_selects_all():
    for n in (1, 3, 16, 197):
        assert inverse_transform_sample(torch.full((2, n), 1.0 / n), n).all()


def test_single_dominant_token_gives_k_prime_one():
    s = torch.tensor([[0.01, 0.97, 0.01, 0.01]])
    keep = inverse_transform_sample(s, 8)
    assert keep.tolist() == [[False, True, False, False]]


def test_zero_scores_never_sampled_and_k_prime_at_most_k():
    keep = inverse_transform_sample(torch.tensor([[0.0, 0.5, 0.0, 0.5]]), 10)
    assert keep.tolist() == [[False, True, False, True]]
    g = torch.Generator().manual_seed(0)
    s = torch.rand(64, 50, generator=g) ** 4
    s = s / s.sum(1, keepdim=True)
    K = torch.randint(1, 60, (64,), generator=g)
    keep = inverse_transform_sample(s, K)
    kp = keep.sum(1)
    assert (kp >= 1).all() and (kp <= torch.minimum(K, torch.tensor(50))).all()
    # The paper: K' < K whenever some token has S_j >= 2/K.
    big = (s >= 2.0 / K[:, None]).any(1)
    assert (kp[big] < K[big]).all()


def test_per_image_budget_matches_separate_calls():
    s = torch.softmax(torch.randn(3, 20, generator=torch.Generator().manual_seed(1)) * 2, 1)
    K = torch.tensor([3, 7, 20])
    joint = inverse_transform_sample(s, K)
    for b in range(3):
        assert torch.equal(joint[b], inverse_transform_sample(s[b:b + 1], int(K[b]))[0])


def test_significance_scores_hand_worked():
    # Two heads, three tokens. Head 0: a*|v| = (.2*1, .3*2, .5*0) -> (.25, .75, 0);
    # head 1: (.5*1, .5*1, 0*3) -> (.5, .5, 0). Sum (.75, 1.25, 0), / 2 heads.
    a = torch.tensor([[[0.2, 0.3, 0.5], [0.5, 0.5, 0.0]]])
    v = torch.tensor([[[1.0, 2.0, 0.0], [1.0, 1.0, 3.0]]])
    s = significance_scores(a, v)
    assert torch.allclose(s, torch.tensor([[0.375, 0.625, 0.0]]))
    # Invalid tokens are excluded and the rest renormalised.
    s = significance_scores(a, v, torch.tensor([[True, False, True]]))
    assert torch.allclose(s, torch.tensor([[1.0, 0.0, 0.0]]))


def test_topk_keep_and_budget():
    s = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.4, 0.3, 0.2, 0.1]])
    assert topk_keep(s, torch.tensor([2, 3])).tolist() == [[False, True, False, True], [True, True, True, False]]
    valid = torch.tensor([[True, False, True, True], [True] * 4])
    assert topk_keep(s, 2, valid).tolist() == [[False, False, True, True], [True, True, False, False]]
    n = torch.tensor([197, 5, 5])
    assert budget_k(n, rho=0.87).tolist() == [171, 8, 8]       # round(171.39); floor of 8
    assert budget_k(torch.tensor([21]), rho=0.5, min_k=1).tolist() == [11]  # 10.5 rounds up
    assert budget_k(n, K=48).tolist() == [48, 48, 48]
    assert default_stages(12) == list(range(3, 12))
    assert default_stages(6) == [2, 3, 4, 5]
    assert default_stages(1) == [0]


# -- the patched model ------------------------------------------------------------------

@pytest.mark.parametrize("execution", ["compact", "mask"])
def test_selecting_every_token_reproduces_the_backbone(execution):
    m = tiny()
    x = torch.randn(4, 3, 32, 32)
    ref = m(x, execution=execution)
    # K far above N: every token of non-zero score owns a quantile, so all are kept.
    iared.patch(m, policy="ats", K=10 ** 4)
    out, info = m(x, return_info=True, execution=execution)
    assert all(bool(s.keep.all()) for s in info.stages)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("compound", [False, True])
def test_padded_batch_equals_one_image_at_a_time_and_mask_mode(compound):
    m = peaked(tiny())
    iared.patch(m, policy="ats", rho=0.6, compound=compound)
    x = torch.randn(6, 3, 32, 32)
    batch, info = m(x, return_info=True, execution="compact")
    counts = torch.stack([s.extras["k_prime"] for s in info.stages], 1)
    assert len(set(counts[:, 0].tolist())) > 1, "test needs images with different K' (padding)"
    alone = [m(x[i:i + 1], return_info=True) for i in range(6)]
    masked, info_m = m(x, return_info=True, execution="mask")
    assert torch.allclose(batch, torch.cat([out for out, _ in alone]), atol=1e-5)
    assert torch.allclose(batch, masked, atol=1e-5)
    for a, b in zip(info.stages, info_m.stages):
        assert torch.equal(a.keep, b.keep)
    for i, (_, one) in enumerate(alone):  # the same kept set alone as inside the padded batch
        for a, b in zip(info.stages, one.stages):
            assert torch.equal(a.keep[i], b.keep[0]), (i, a.block)


def test_rho_scales_the_unreduced_tokens_unless_compounding():
    m = peaked(tiny())                                  # 64 patches + CLS = 65 tokens
    iared.patch(m, policy="ats", rho=0.6)
    x = torch.randn(3, 3, 32, 32)
    _, info = m(x, return_info=True)
    # round(0.6 * 65) = 39 at every stage, however many tokens earlier stages left
    assert [s.extras["budget"].tolist() for s in info.stages] == [[39] * 3] * len(info.stages)
    entering = [int(s.entering.sum()) for s in info.stages]
    assert entering[-1] < entering[0]
    m.policy.settings.compound = True
    _, info = m(x, return_info=True)
    budgets = torch.stack([s.extras["budget"] for s in info.stages], 1)   # (B, stages)
    tokens_in = torch.stack([s.entering.reshape(3, -1).sum(1) + 1 for s in info.stages], 1)
    assert torch.equal(budgets, budget_k(tokens_in, rho=0.6))           # K_n from the tokens entering stage n
    assert bool((budgets[:, -1] < budgets[:, 0]).all())


def test_records_nest_and_count():
    m = peaked(tiny())
    iared.patch(m, policy="ats", stages=[2, 4], K=[20, 10])
    _, info = m(torch.randn(3, 3, 32, 32), return_info=True)
    assert [s.block for s in info.stages] == [2, 4]
    prev = torch.ones(3, 64, dtype=torch.bool)
    for s, K in zip(info.stages, (20, 10)):
        assert torch.equal(s.entering, prev)
        assert not (s.keep & ~s.entering).any()
        assert torch.equal(s.keep.sum(1), s.extras["k_prime"])
        assert (s.extras["k_prime"] <= K).all()
        assert torch.allclose(s.scores.sum(1), torch.ones(3), atol=1e-5)
        assert (s.scores[~s.entering] == 0).all()
        prev = s.keep
    # Tokens entering block 5 = CLS + what block 4 kept.
    assert torch.equal(info.block_tokens[:, 5], info.stages[1].keep.sum(1) + 1)


def test_differentiable_in_mask_mode():
    m = peaked(tiny())
    iared.patch(m, policy="ats", rho=0.5)
    m.train()
    loss = m(torch.randn(2, 3, 32, 32)).logsumexp(1).sum()
    loss.backward()
    g = m.blocks[3].attn.qkv.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_attach_detach_and_model_file(tmp_path):
    m = tiny()
    keys = set(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    iared.patch(m, policy="ats", rho=0.5)
    assert all(type(m.blocks[i]) is ATSBlock for i in (2, 3, 4, 5)) and type(m.blocks[1]) is Block
    assert set(m.state_dict()) == keys  # parameter-free
    assert_block_swap_round_trip(m, x, ref, tmp_path / "ats.safetensors")


def test_patching_over_ats_replaces_it():
    # A second `patch` used to leave ATS's blocks in place under the new policy (both acted,
    # and `unpatch` no longer restored the plain blocks).
    m = tiny()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    iared.patch(m, policy="ats", rho=0.5)
    ats = m.policy
    iared.patch(m, policy="random", keep_ratio=1.0)
    assert all(type(b) is Block for b in m.blocks)
    assert torch.equal(m(x), ref)  # keeps everything: the plain backbone's logits
    iared.patch(m, ats)
    with pytest.raises(ValueError, match="unknown policy"):
        iared.patch(m, policy="no_such_policy")
    assert m.policy is ats and type(m.blocks[2]) is ATSBlock  # a failed patch keeps the old policy


def test_variants_run_and_nocls_moves_first_token():
    m = peaked(tiny(), 12.0)
    x = torch.randn(4, 3, 32, 32)
    for name in ("topk", "ats_selfattn", "ats_nocls", "ats_single"):
        mm = iared.patch(copy.deepcopy(m), policy=name, rho=0.5)
        a, info = mm(x, return_info=True, execution="compact")
        b = mm(x, execution="mask")
        assert torch.allclose(a, b, atol=1e-5), name
        if name == "topk":  # top-K keeps exactly K (capped by the tokens there are)
            n_in = info.block_tokens[:, info.stages[0].block]
            assert torch.equal(info.stages[0].keep.sum(1), budget_k(n_in, rho=0.5))
    assert len(iared.patch(copy.deepcopy(m), policy="ats_single", K=20).policy.settings.stages) == 1


def test_every_registry_backbone_accepts_ats():
    for name in iared.list_models():
        # The 224/384 models at 64 px (16 tokens), width 96, so the test takes seconds; depth,
        # heads and prefix tokens stay as registered.
        small = dict(img_size=64, embed_dim=96, num_classes=10) if ("patch16" in name or "custom" in name) else {}
        if "jointst" in name:
            small.update(num_frames=2)
        m = iared.create_model(name, **small).eval()
        stages = range(3, 12) if m.config.depth == 12 else None
        iared.patch(m, policy="ats", stages=stages, rho=0.87)
        shape = (2, m.config.in_chans) + ((2,) if "jointst" in name else ()) + tuple(m.patch_embed.img_size)
        out, info = m(torch.randn(shape), return_info=True)
        assert out.shape == (2, m.config.num_classes) and len(info.stages) == len(m.policy.settings.stages), name


def test_pretrained_checkpoints_with_ats(shared_dir):
    for arch, file in (("vit_mnist_patch7_28", "vit_mnist_gauravpbhagwat.pth"),
                       ("vit_tiny8_patch4_32", "vit_tiny8_cifar10_yihsiu7893.pt")):
        m = iared.load_pretrained(iared.create_model(arch), shared_dir / "models" / file).eval()
        x = torch.randn(3, m.config.in_chans, *m.patch_embed.img_size)
        ref = m(x)
        iared.patch(m, policy="ats", K=10 ** 4)
        assert torch.equal(m(x), ref)
        m.policy.settings.K, m.policy.settings.rho = None, 0.5
        out, info = m(x, return_info=True)
        assert torch.isfinite(out).all() and info.keep_ratio.max() < 1


def test_one_k_for_all_images_samples_as_per_image_budgets():
    # The int-K path (no padding quantiles) against the per-image path with equal budgets,
    # on scores with zeros (never chosen) and ties.
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(6, 40, generator=gen) ** 4
    scores[:, ::7] = 0
    scores[1] = 1.0
    scores = scores / scores.sum(dim=1, keepdim=True)
    for K in (1, 5, 17, 40, 90):
        fast = inverse_transform_sample(scores, K)
        ref = inverse_transform_sample(scores, torch.full((6,), K))
        assert torch.equal(fast, ref), K
    with pytest.raises(ValueError):
        inverse_transform_sample(scores, 0)
    for n, rho, K in ((197, 0.775, None), (10, 0.5, None), (151, 0.7, None), (50, None, 12)):
        assert budget_k(n, rho, K) == int(budget_k(torch.tensor([n]), rho, K)[0])


def test_real_vit_tiny_default_budget_and_batch_invariance(shared_dir):
    # rho = 1 is K = 197 at every one of the nine stages; kept sets do not depend on the batch.
    from iared.data import build_dataset

    m = iared.load_pretrained(iared.create_model("vit_tiny_patch16_224"),
                              shared_dir / "models" / "vit_tiny_patch16_224_augreg_in1k.safetensors").eval()
    ds = build_dataset(f"imagefolder:{shared_dir / 'data' / 'imagenet_val_subset'}",
                       "test", preprocess=m.pretrained_cfg)
    x = torch.stack([ds[i]["image"] for i in range(4)])
    iared.patch(m, policy="ats")
    with torch.inference_mode():
        out, info = m(x, return_info=True)
        assert [s.block for s in info.stages] == list(range(3, 12))
        assert all(s.extras["budget"].tolist() == [197] * 4 for s in info.stages)
        kept = info.stages[-1].keep.reshape(4, -1).sum(1)
        assert bool((kept < 196).all()) and bool((kept > 8).all())
        for i in range(4):
            one, info1 = m(x[i:i + 1], return_info=True)
            assert torch.allclose(one, out[i:i + 1], atol=1e-4)
            assert all(torch.equal(a.keep[i], b.keep[0]) for a, b in zip(info.stages, info1.stages))
