"""EViT: the keep/fuse math by hand, the patched block against a direct reference, and the model
in both execution modes, under the CPU kernels, in the FLOP count, `iared eval` and `iared interpret`."""

import copy
import json
import math

import pytest
import torch

import iared
from iared.backbones.kernels import cpu_kernels
from iared.backbones.tokens import apply_keep, to_grid
from iared.evaluation.flops import count_flops, vit_macs
from iared.reduction.evit import EViTBlock, cls_attentiveness, default_stages, evit_keep, fuse_inattentive, keep_count

from helpers import TinyData, assert_block_swap_round_trip, model_file, peaked, tiny, tiny_classifier, write_png


# -- the math ---------------------------------------------------------------------------

def test_keep_count_is_a_ceiling():
    # DeiT's 196 patches at rho = 0.7: ceil(137.2) = 138, then 138 + 1 fused = 139 -> ceil(97.3) = 98, 99 -> 70.
    assert [keep_count(n, 0.7) for n in (196, 139, 99)] == [138, 98, 70]
    assert keep_count(10, 0.7) == 7          # 0.7 * 10 is 7.000000000000001 in floats: not 8
    assert keep_count(21, 0.5) == 11 and keep_count(5, 1.0) == 5
    assert keep_count(3, 0.01) == 1 and keep_count(0, 0.5) == 0
    n = torch.tensor([196, 10, 21, 3])
    assert keep_count(n, 0.7).tolist() == [keep_count(int(v), 0.7) for v in n]


def test_cls_attentiveness_hand_worked():
    # One image, two heads, CLS + 2 patches, head width 1, scale 1.
    # Head 0: q_CLS = 1, keys (0, ln 2, 0): softmax of (0, ln 2, 0) = (1/4, 1/2, 1/4).
    # Head 1: q_CLS = 0: uniform (1/3, 1/3, 1/3). Patch columns averaged: (5/12, 7/24).
    q = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 3, 1)
    k = torch.tensor([[0.0, math.log(2.0), 0.0], [1.0, 2.0, 3.0]]).view(1, 2, 3, 1)
    a = cls_attentiveness(q, k, 1.0, num_prefix=1)
    assert torch.allclose(a, torch.tensor([[5 / 12, 7 / 24]]))
    # The last token masked as a key: head 0 (1/3, 2/3, 0), head 1 (1/2, 1/2, 0).
    a = cls_attentiveness(q, k, 1.0, num_prefix=1, valid=torch.tensor([[True, True, False]]))
    assert torch.allclose(a, torch.tensor([[7 / 12, 0.0]]))


def test_evit_keep_hand_worked():
    a = torch.tensor([[0.1, 0.4, 0.2, 0.3, 0.0]])
    # rho = 0.5 of 5: ceil(2.5) = 3 tokens, the three largest: 0.4, 0.3, 0.2.
    assert evit_keep(a, 0.5).tolist() == [[False, True, True, True, False]]
    assert evit_keep(a, 1.0).all()
    # Ties go to the earlier token: ceil(1.5) = 2 of three equal scores.
    assert evit_keep(torch.full((1, 3), 0.2), 0.5).tolist() == [[True, True, False]]
    # Only valid tokens count and compete: n = 3, ceil(1.5) = 2 of tokens 0, 2, 3.
    valid = torch.tensor([[True, False, True, True], [True] * 4])
    keep = evit_keep(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.4, 0.3, 0.2, 0.1]]), 0.5, valid)
    assert keep.tolist() == [[False, False, True, True], [True, True, False, False]]


def test_fuse_inattentive_hand_worked():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]]])
    a = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    # Tokens 0 and 2 inattentive: 0.1 * (1, 0) + 0.2 * (2, 2) = (0.5, 0.4); not divided by 0.3.
    fused = fuse_inattentive(x, a, torch.tensor([[True, False, True, False]]))
    assert torch.allclose(fused, torch.tensor([[0.5, 0.4]]))
    assert torch.equal(fuse_inattentive(x, a, torch.zeros(1, 4, dtype=torch.bool)), torch.zeros(1, 2))


def test_default_stages():
    assert default_stages(12) == [3, 6, 9]
    assert default_stages(24) == [6, 12, 18]
    assert default_stages(6) == [2, 3, 5]
    assert default_stages(3) == [1, 2]
    assert default_stages(1) == [0]


# -- the block --------------------------------------------------------------------------

def _reference_block(blk, x, P, rho, grid):
    """One EViT block written out from the explicit attention matrix, image by image."""
    probs = blk.attn.attention_probs(blk.norm1(x))                  # (B, H, L, L)
    h = x + blk.attn(blk.norm1(x))
    outs, poss = [], []
    for b in range(x.shape[0]):
        a = probs[b, :, 0, P:].mean(0)                               # (N,)
        N = a.numel()
        K = math.ceil(round(rho * N, 9))
        top = sorted(a.argsort(descending=True)[:K].tolist())
        rest = sorted(set(range(N)) - set(top))
        fused = sum(a[j] * h[b, P + j] for j in rest)
        seq = torch.cat([h[b, :P], h[b, [P + j for j in top]], fused[None]])
        outs.append(seq + blk.mlp(blk.norm2(seq)))
        poss.append(top + [grid])
    return torch.stack(outs), torch.tensor(poss)


@pytest.mark.parametrize("distilled", [False, True])
def test_block_keeps_top_tokens_and_appends_the_fused_one(distilled):
    m = peaked(tiny(distilled=distilled))
    iared.patch(m, policy="evit", stages=[1], keep_rate=0.6)
    P, G = m.num_prefix_tokens, m.grid_size
    with torch.no_grad():
        tokens = m.blocks[0](m.embed(torch.randn(3, 3, 32, 32)))
        new, record = m.blocks[1](tokens)
        ref_x, ref_pos = _reference_block(m.blocks[1], tokens.x, P, 0.6, G)
    K = math.ceil(0.6 * 64)                                            # 39 kept + 1 fused
    assert new.x.shape == (3, P + K + 1, 32) and new.valid is None
    assert torch.allclose(new.x, ref_x, atol=1e-5)
    assert torch.equal(new.pos, ref_pos)
    # The fused token is a real token (counted) with no grid cell of its own.
    assert new.kept_counts().tolist() == [K + 1] * 3
    on_grid = to_grid(torch.ones(3, K + 1), new, G)
    assert on_grid.sum(1).tolist() == [K] * 3
    assert record.block == 1 and record.keep.sum(1).tolist() == [K] * 3 and record.entering.all()
    assert record.extras["budget"].tolist() == [K] * 3
    # The record's scores are the CLS attentiveness on the grid (the whole CLS row sums to 1).
    assert (record.scores >= 0).all() and (record.scores.sum(1) < 1).all()


# -- the patched model ------------------------------------------------------------------

@pytest.mark.parametrize("execution", ["compact", "mask"])
@pytest.mark.parametrize("distilled", [False, True])
def test_keep_rate_one_is_the_backbone(execution, distilled):
    m = tiny(distilled=distilled)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = m(x, execution=execution)
        iared.patch(m, policy="evit", keep_rate=1.0)
        out, info = m(x, return_info=True, execution=execution)
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(out, ref)  # the same operations: bit for bit
    assert all(bool(s.keep.all()) for s in info.stages)
    assert (info.block_tokens == 64 + m.num_prefix_tokens).all()


@pytest.mark.parametrize("distilled", [False, True])
def test_compact_mask_and_one_image_at_a_time_agree(distilled):
    m = peaked(tiny(distilled=distilled))
    iared.patch(m, policy="evit", keep_rate=0.7)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        batch, info = m(x, return_info=True, execution="compact")
        masked, info_m = m(x, return_info=True, execution="mask")
        single = torch.cat([m(x[i:i + 1]) for i in range(6)])
    assert torch.allclose(batch, masked, atol=1e-5)
    assert torch.allclose(batch, single, atol=1e-5)
    assert torch.equal(info.block_tokens, info_m.block_tokens)
    for a, b in zip(info.stages, info_m.stages):
        assert torch.equal(a.keep, b.keep) and torch.allclose(a.scores, b.scores, atol=1e-6)


def test_token_counts_records_and_the_fused_token_competing_later():
    m = peaked(tiny())
    iared.patch(m, policy="evit")                                      # rho = 0.7 at blocks 2, 3, 5
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        _, info = m(x, return_info=True)
        out_tokens, _, _ = m.forward_tokens(m.embed(x))
    assert [s.block for s in info.stages] == [2, 3, 5]
    # 64 -> ceil(44.8) = 45 + fused; 46 -> ceil(32.2) = 33 + fused; 34 -> ceil(23.8) = 24 + fused.
    assert info.block_tokens[0].tolist() == [65, 65, 65, 47, 35, 35]
    assert (info.block_tokens == info.block_tokens[0]).all()           # equal counts: no padding
    prev = torch.ones(8, 64, dtype=torch.bool)
    for s, K in zip(info.stages, (45, 33, 24)):
        assert torch.equal(s.entering, prev) and not (s.keep & ~s.entering).any()
        assert (s.scores[~s.entering] == 0).all()
        assert (s.extras["budget"] == K).all()
        prev = s.keep
    # From the second stage on, earlier fused tokens are among the N candidates (N counts
    # them, the grid does not): each image keeps K tokens, those of them not on the grid fused ones.
    fused_kept = []
    for s, K, n_in in zip(info.stages[1:], (33, 24), (46, 34)):
        fused_in = n_in - s.entering.sum(1)                            # fused tokens entering: 1, then 1 or 2
        fused_kept.append(K - s.keep.sum(1))
        assert ((fused_kept[-1] >= 0) & (fused_kept[-1] <= fused_in)).all()
    assert fused_kept[0].bool().any() and not fused_kept[0].bool().all()  # kept by some images, fused again by others
    # After the last stage: the newest fused token last, the older ones kept before it.
    assert (out_tokens.pos[:, -1] == 64).all()
    assert torch.equal((out_tokens.pos == 64).sum(1), 1 + fused_kept[1])
    assert torch.equal(out_tokens.kept_counts(), torch.full((8,), 25))


def test_padded_compact_tokens_entering_a_stage():
    """Images arriving with different counts (padding) still keep ceil(rho * n_b) each, as in mask mode."""
    m = peaked(tiny())
    iared.patch(m, policy="evit", stages=[2, 4], keep_rate=0.6)
    x = torch.randn(4, 3, 32, 32)
    keep = torch.rand(4, 64, generator=torch.Generator().manual_seed(0)) < torch.tensor([[0.3], [0.6], [0.9], [1.0]])
    logits = {}
    with torch.no_grad():
        for execution in ("compact", "mask"):
            tokens = apply_keep(m.embed(x, execution), keep)
            out, records, counts = m.forward_tokens(tokens)
            logits[execution] = m.forward_head(out)
            n = keep.sum(1)
            n2 = keep_count(n, 0.6) + 1
            assert torch.equal(counts[:, 3], n2 + 1) and torch.equal(counts[:, 5], keep_count(n2, 0.6) + 2)
            assert torch.equal(records[0].keep.sum(1), keep_count(n, 0.6))
    assert torch.allclose(logits["compact"], logits["mask"], atol=1e-5)
    single = torch.cat([m.forward_head(m.forward_tokens(apply_keep(m.embed(x[i:i + 1]), keep[i:i + 1]))[0])
                        for i in range(4)])
    assert torch.allclose(logits["compact"], single, atol=1e-5)


def test_every_registry_backbone_accepts_evit():
    for name in iared.list_models():
        # As in test_ats: the 224/384 models at 64 px (16 tokens), width 96; depth, heads and prefix as registered.
        small = dict(img_size=64, embed_dim=96, num_classes=10) if ("patch16" in name or "custom" in name) else {}
        if "jointst" in name:
            small.update(num_frames=2)
        m = iared.create_model(name, **small).eval()
        iared.patch(m, policy="evit")
        shape = (2, m.config.in_chans) + ((2,) if "jointst" in name else ()) + tuple(m.patch_embed.img_size)
        with torch.no_grad():
            out, info = m(torch.randn(shape), return_info=True)
        assert out.shape == (2, m.config.num_classes), name
        assert [s.block for s in info.stages] == default_stages(m.config.depth), name
        assert info.block_tokens[0, -1] < info.block_tokens[0, 0], name


def test_differentiable_in_mask_mode():
    m = peaked(tiny())
    iared.patch(m, policy="evit", keep_rate=0.5)
    m.train()
    out, info = m(torch.randn(2, 3, 32, 32), return_info=True)
    assert info.block_tokens[0].tolist() == [65, 65, 65, 34, 19, 19]   # 32 + fused, then 17 + fused (mask mode)
    out.logsumexp(1).sum().backward()
    g = m.blocks[2].attn.qkv.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_cpu_kernels_give_the_same_logits():
    m = peaked(tiny())
    iared.patch(m, policy="evit", keep_rate=0.6)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        ref = m(x)
        with cpu_kernels(m):
            fast = m(x)
            alone = m(x[1:2])
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, ref[1:2], rtol=1e-4, atol=1e-5)


def test_knob_attach_detach_and_model_file(tmp_path):
    m = tiny()
    keys = set(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    iared.patch(m, policy="evit", keep_rate=0.5)
    assert [type(b) is EViTBlock for b in m.blocks] == [False, False, True, True, False, True]
    assert set(m.state_dict()) == keys  # parameter-free
    assert m.policy.config() == {"name": "evit", "stages": [2, 3, 5], "keep_rate": 0.5, "fuse_token": True}
    m.policy.keep_rate = 0.7                                           # the blocks share the settings
    assert m.blocks[2].evit.keep_rate == 0.7
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError):
            m.policy.keep_rate = bad
    with pytest.raises(ValueError):
        iared.patch(copy.deepcopy(m), policy="evit", stages=[6])
    assert_block_swap_round_trip(m, x, ref, tmp_path / "evit.safetensors")


def test_without_fusion_drops_the_inattentive_tokens():
    m = peaked(tiny())
    iared.patch(m, policy="evit", keep_rate=0.7, fuse_token=False)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, info = m(x, return_info=True)
        b = m(x, execution="mask")
    assert info.block_tokens[0].tolist() == [65, 65, 65, 46, 33, 33]  # 45, 32, 23 patches: no fused token
    assert torch.allclose(a, b, atol=1e-5)


def test_flops_follow_the_token_counts():
    """vit_tiny at 224 (random weights): the counted work is what `block_tokens` implies."""
    m = iared.create_model("vit_tiny_patch16_224").eval()
    iared.patch(m, policy="evit", keep_rate=0.7)
    x = torch.randn(1, 3, 224, 224)
    counted = count_flops(m, x)
    with torch.no_grad():
        _, info = m(x, return_info=True)
    n = info.block_tokens
    assert n[0].tolist() == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
    D, hidden = 192, 768
    implied = vit_macs(n, D) + 196 * D * (16 * 16 * 3) + D * 1000      # blocks, patch embedding, head
    for s in m.policy.settings.stages:  # a stage block's FFN already runs on the tokens it keeps
        implied -= 2 * D * hidden * (n[:, s] - n[:, s + 1]).double()
    # What remains is the CLS row and the fusion, about D * N each per stage (~0.02 %).
    assert torch.allclose(counted, implied, rtol=1e-3)
    assert counted.item() / 1e9 == pytest.approx(0.8209, abs=1e-3)   # unreduced: 1.2537


# -- the tools --------------------------------------------------------------------------

def test_eval_runs_evit(tmp_path):
    from iared.cli import main
    from iared.data import DATASETS, register_dataset

    register_dataset("tiny-evit", lambda path, split, seed, **kw: TinyData(split, seed, **kw))
    try:
        ckpt = tmp_path / "backbone.safetensors"
        iared.save_model(tiny_classifier(), ckpt, arch="vit_custom",
                         data={"kind": "tiny", "mean": [0.0] * 3, "std": [1.0] * 3})
        out = tmp_path / "eval.json"
        argv = ["eval", "--data", "tiny-evit", "--checkpoint", str(ckpt), "--methods", "original,evit@0.7,evit@0.5",
                "--json", str(out), "--flops-images", "2", "--no-throughput", "--batch-size", "8"]
        assert main(argv) == 0
    finally:
        DATASETS.pop("tiny-evit", None)
    res = json.loads(out.read_text())["methods"]
    # depth 3: stages 1, 2; 16 patches -> ceil(11.2) = 12 + fused -> ceil(9.1) = 10 + fused at rho = 0.7.
    r = res["evit@0.7"]
    assert r["policy"] == {"name": "evit", "stages": [1, 2], "keep_rate": 0.7, "fuse_token": True}
    assert r["stage_blocks"] == [1, 2] and r["n_images"] == 12
    assert res["evit@0.5"]["gflops_per_img"] < r["gflops_per_img"] < res["original"]["gflops_per_img"]
    assert r["token_ratio"] == pytest.approx((17 + 17 + 14) / (3 * 17))


def test_interpret_draws_an_evit_model(tmp_path, capsys):
    from iared.cli import main
    from iared.commands.interpret import InterpretOptions, data_config, interpret_one, run_interpreters

    path = model_file(tmp_path / "evit.safetensors", policy=False)
    m = iared.patch(iared.load_model(path), policy="evit", keep_rate=0.5)
    img = write_png(tmp_path / "photo.png")
    out = run_interpreters(m, torch.rand(3, 16, 16))
    assert len(out["scores"]) == len(out["keep"]) == 2                  # depth 3: stages 1, 2
    assert out["keep"][0].sum() == 8 and not (out["keep"][1] & ~out["keep"][0]).any()
    opts = InterpretOptions(paths=(img,), out=str(tmp_path / "out"), checkpoint=str(path), progress=False)
    rec = interpret_one(m, data_config(m.model_meta, m), img, tmp_path / "out" / "photo", str(path), opts)
    assert rec["groups"] == 2 and rec["keep_ratio_per_group"][0] == 0.5
    assert (tmp_path / "out" / "photo" / "panel.png").is_file()
    # The CLI on an EViT model file: it runs, or refuses in one line (it is made for IA-RED² files).
    iared.save_model(m, path, arch="vit_custom", data=m.model_meta.get("data"))
    capsys.readouterr()
    rc = main(["interpret", "--no-progress", "-p", img, "-o", str(tmp_path / "cli"), "--checkpoint", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 0 or (rc == 2 and len(err.splitlines()) == 1), err
