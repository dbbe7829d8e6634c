"""ToMe: the matching and merging against hand-worked values, and the patched model against the plain one."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import iared
from iared.backbones.kernels import cpu_kernels
from iared.backbones.tokens import Tokens, apply_keep, initial_tokens
from iared.backbones.vit import Block
from iared.cli import main
from iared.data import DATASETS, register_dataset
from iared.data.base import DataInfo
from iared.evaluation.flops import count_flops
from iared.reduction.tome import (MergePlan, ToMeBlock, bipartite_soft_matching, merge_owner, merge_weighted,
                                  proportional_bias, source_matrix)

from helpers import tiny


# -- the math ---------------------------------------------------------------------------

# Five tokens, CLS first: A = {0 (CLS), 2, 4}, B = {1, 3}.
#   t1 = (1, 0), t3 = (0, 1)                       (set B)
#   t2 = (3, 4): cos with t1 = 0.6, with t3 = 0.8  -> t3, 0.8
#   t4 = (2, 0): cos with t1 = 1.0, with t3 = 0    -> t1, 1.0
#   t0 = (1, 0) would match t1 at 1.0, but it is CLS.
METRIC = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [0.0, 1.0], [2.0, 0.0]]])


def test_matching_hand_worked():
    plan = bipartite_soft_matching(METRIC, 1)
    assert plan.src.tolist() == [[4]] and plan.dst.tolist() == [[1]]
    assert plan.similarity[0].tolist() == pytest.approx([1.0])
    plan = bipartite_soft_matching(METRIC, 2)
    assert plan.src.tolist() == [[4, 2]] and plan.dst.tolist() == [[1, 3]]
    assert plan.similarity[0].tolist() == pytest.approx([1.0, 0.8])


def test_cls_never_merged_and_r_clamped():
    # r = 5 asks for more than half: (5 - 1) // 2 = 2 merges, and CLS (t0) is not among them.
    plan = bipartite_soft_matching(METRIC, 5)
    assert plan.r == 2 and 0 not in plan.src.tolist()[0] and 0 not in plan.dst.tolist()[0]
    assert bipartite_soft_matching(METRIC, 0).r == 0
    assert bipartite_soft_matching(METRIC[:, :2], 3).r == 0  # CLS and one token: nothing may merge
    # A distillation token (position 1, set B) takes no merges either: t4 goes to t3 instead.
    plan = bipartite_soft_matching(METRIC, 1, protected=2)
    assert plan.src.tolist() == [[2]] and plan.dst.tolist() == [[3]]  # t2 -> t3 (0.8) beats t4 -> t3 (0)


def test_several_tokens_merge_into_one():
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    plan = bipartite_soft_matching(metric, 2)
    assert sorted(plan.src.tolist()[0]) == [2, 4] and plan.dst.tolist() == [[1, 1]]
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 6.0]])[..., None]
    merged, size = merge_weighted(x, torch.ones(1, 5), plan)
    assert merged[0, 1, 0] == pytest.approx(3.0)          # (1 + 2 + 6) / 3
    assert size[0, 1] == 3


def test_merge_is_size_weighted():
    plan = bipartite_soft_matching(METRIC, 2)              # t4 -> t1, t2 -> t3
    x = torch.tensor([[[10.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
    size = torch.tensor([[1.0, 1.0, 2.0, 1.0, 3.0]])
    merged, new_size = merge_weighted(x, size, plan)
    assert merged[0, 1].tolist() == pytest.approx([13 / 4] * 2)   # (1 * 1 + 3 * 4) / 4
    assert merged[0, 3].tolist() == pytest.approx([7 / 3] * 2)    # (2 * 2 + 1 * 3) / 3
    assert new_size[0, [1, 3]].tolist() == [4.0, 3.0]
    assert torch.equal(merged[0, [0, 2, 4]], x[0, [0, 2, 4]])    # everything else untouched


def test_matching_over_valid_tokens_alternates_by_rank():
    # Mask mode: an invalid token at position 2 is skipped, as if removed.
    full = torch.cat([METRIC[:, :2], torch.tensor([[[5.0, 5.0]]]), METRIC[:, 2:]], dim=1)   # (1, 6, 2)
    valid = torch.tensor([[True, True, False, True, True, True]])
    plan = bipartite_soft_matching(full, 2, valid=valid)
    assert plan.src.tolist() == [[5, 3]] and plan.dst.tolist() == [[1, 4]]   # the hand-worked pairs, shifted
    with pytest.raises(ValueError, match="same number"):
        bipartite_soft_matching(full.expand(2, -1, -1), 1, valid=torch.stack([valid[0], torch.ones(6).bool()]))


def test_owner_and_source_follow_merges():
    pos = torch.tensor([[0, 1, 2, 3]])                      # 4 patches behind one CLS
    owner = torch.arange(4)[None]
    plan = MergePlan(src=torch.tensor([[4]]), dst=torch.tensor([[1]]), similarity=torch.ones(1, 1))
    owner = merge_owner(owner, pos, plan, num_prefix=1)     # token 4 (cell 3) into token 1 (cell 0)
    assert owner.tolist() == [[0, 1, 2, 0]]
    # Next block: tokens cells (0, 1, 2) after compaction; cell 0's token merges into cell 1's.
    pos = torch.tensor([[0, 1, 2]])
    plan = MergePlan(src=torch.tensor([[1]]), dst=torch.tensor([[2]]), similarity=torch.ones(1, 1))
    owner = merge_owner(owner, pos, plan, num_prefix=1)
    assert owner.tolist() == [[1, 1, 2, 1]]
    source = source_matrix(owner, torch.tensor([[1, 2]]))
    assert source.tolist() == [[[True, True, False, True], [False, False, True, False]]]


def test_proportional_attention_counts_a_token_as_its_size():
    # A key of size 2 is attended as two copies of it would be.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g) for _ in range(3))
    bias = proportional_bias(torch.tensor([[1.0, 2.0, 1.0]]), None, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    dup = [0, 1, 1, 2]
    ref = F.scaled_dot_product_attention(q, k[:, :, dup], v[:, :, dup])
    torch.testing.assert_close(out, ref)
    assert proportional_bias(None, None, q.dtype) is None
    valid = torch.tensor([[True, False, True]])
    assert proportional_bias(torch.ones(1, 3), valid, q.dtype)[0, 0, 0].tolist() == [0.0, float("-inf"), 0.0]


def test_apply_keep_carries_sizes():
    g = torch.Generator().manual_seed(0)
    tokens = initial_tokens(torch.randn(2, 5, 3, generator=g), 1)
    size = torch.arange(10.0).view(2, 5)
    keep = torch.tensor([[True, False, True, True], [False, True, True, True]])
    for t in (tokens, Tokens(tokens.x, tokens.pos, torch.ones(2, 5, dtype=torch.bool), 1)):
        out = apply_keep(Tokens(t.x, t.pos, t.valid, 1, size=size), keep)
        assert out.size.tolist() == [[0, 1, 3, 4], [5, 7, 8, 9]]
    one = apply_keep(Tokens(tokens.x[:1], tokens.pos[:1], None, 1, size=size[:1]), keep[:1])
    assert one.size.tolist() == [[0, 1, 3, 4]]
    padded = apply_keep(Tokens(tokens.x, tokens.pos, None, 1, size=size), torch.tensor([[True] * 4, [False] * 4]))
    assert padded.size[0].tolist() == [0, 1, 2, 3, 4] and padded.size[1, 0] == 5
    assert apply_keep(tokens, keep).size is None


# -- the patched model ------------------------------------------------------------------

@pytest.mark.parametrize("execution", ["compact", "mask"])
def test_r_zero_is_the_backbone(execution):
    m = tiny()
    x = torch.randn(3, 3, 32, 32)
    ref = m(x, execution=execution)
    iared.patch(m, policy="tome", r=0)
    out, info = m(x, return_info=True, execution=execution)
    assert (out - ref).abs().max() <= 1e-5
    assert len(info.stages) == 6 and all(bool(s.keep.all()) for s in info.stages)


def test_mask_equals_compact_and_batch_equals_one_image():
    m = iared.patch(tiny(), policy="tome", r=5)
    x = torch.randn(4, 3, 32, 32)
    compact, info = m(x, return_info=True, execution="compact")
    masked, info_m = m(x, return_info=True, execution="mask")
    torch.testing.assert_close(compact, masked, rtol=0, atol=1e-5)
    for a, b in zip(info.stages, info_m.stages):
        assert torch.equal(a.keep, b.keep) and torch.equal(a.entering, b.entering)
    single = torch.cat([m(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(compact, single, rtol=0, atol=1e-5)
    assert not torch.allclose(compact, iared.unpatch(m)(x), atol=1e-3)  # it did change something


def test_counts_records_and_default_budget():
    m = iared.patch(tiny(), policy="tome")
    assert m.policy.r == 8 and m.policy.config() == {"name": "tome", "r": 8, "prop_attn": True,
                                                     "trace_source": False}
    _, info = m(torch.randn(2, 3, 32, 32), return_info=True)
    # 65 tokens: 8 merged in each block while (n - 1) // 2 allows it: 65, 57, 49, 41, 33, 25 entering.
    assert info.block_tokens[0].tolist() == [65, 57, 49, 41, 33, 25]
    prev = torch.ones(2, 64, dtype=torch.bool)
    for s in info.stages:
        assert torch.equal(s.entering, prev) and not (s.keep & ~s.entering).any()
        assert s.scores is None and s.extras["r"].tolist() == [8, 8]
        assert torch.equal(s.keep.sum(1), s.entering.sum(1) - 8)
        prev = s.keep
    m.policy.r = 12  # settable after patching; the last blocks are clamped
    _, info = m(torch.randn(1, 3, 32, 32), return_info=True)
    assert info.block_tokens[0].tolist() == [65, 53, 41, 29, 17, 9]
    assert [int(s.extras["r"]) for s in info.stages] == [12, 12, 12, 12, 8, 4]
    for bad in (-1, 2.5, "8", True):
        with pytest.raises(ValueError, match="non-negative integer"):
            m.policy.r = bad


@pytest.mark.parametrize("execution", ["compact", "mask"])
def test_traced_source_covers_the_grid(execution):
    m = iared.patch(tiny(), policy="tome", r=6, trace_source=True)
    x = torch.randn(2, 3, 32, 32)
    tokens, records, _ = m.forward_tokens(m.embed(x, execution))
    G = m.grid_size
    for rec in records:
        owner, source = rec.extras["owner"], rec.extras["source"]
        assert torch.equal(source.sum(1), torch.ones(2, G, dtype=torch.long))      # each cell in one token
        assert torch.equal(rec.keep, owner == torch.arange(G))                       # survivors own their cell
    sizes = tokens.size[:, 1:]
    covered = records[-1].extras["source"].sum(-1).float()
    assert torch.equal(covered, torch.where(tokens.patch_valid, sizes, 0.0))       # size = cells covered
    untraced = iared.patch(copy.deepcopy(m), policy="tome", r=6)
    torch.testing.assert_close(untraced(x, execution=execution), m(x, execution=execution), rtol=0, atol=0)


def test_distilled_prefix_is_never_merged():
    m = iared.patch(tiny(distilled=True), policy="tome", r=6, trace_source=True)
    x = torch.randn(3, 3, 32, 32)
    a, info = m(x, return_info=True)
    torch.testing.assert_close(a, m(x, execution="mask"), rtol=0, atol=1e-5)
    assert info.block_tokens[0, -1] == 66 - 6 * 5
    tokens, _, _ = m.forward_tokens(m.embed(x))
    assert (tokens.size[:, :2] == 1).all()


def test_differentiable_in_mask_mode():
    m = iared.patch(tiny(), policy="tome", r=4)
    m.train()
    m(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    g = m.blocks[3].attn.qkv.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_cpu_kernels_give_the_same_logits():
    m = iared.patch(tiny(), policy="tome", r=6)
    x = torch.randn(3, 3, 32, 32)
    ref = m(x)
    with torch.inference_mode(), cpu_kernels(m):
        fast = m(x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_attach_detach_and_model_file(tmp_path):
    m = tiny()
    keys = set(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    iared.patch(m, policy="tome", r=4)
    assert all(type(b) is ToMeBlock for b in m.blocks) and set(m.state_dict()) == keys  # parameter-free
    patched = m(x)
    path = tmp_path / "tome.safetensors"
    iared.save_model(m, path, arch="vit_custom")
    loaded = iared.load_model(path)
    assert loaded.policy.config() == m.policy.config()
    assert torch.equal(loaded(x), patched)
    iared.patch(m, policy="random", keep_ratio=1.0)  # patching over ToMe restores the plain blocks
    assert all(type(b) is Block for b in m.blocks) and torch.equal(m(x), ref)
    iared.unpatch(m)
    assert torch.equal(m(x), ref)


def test_every_registry_backbone_accepts_tome():
    for name in iared.list_models():
        small = dict(img_size=64, embed_dim=96, num_classes=10) if ("patch16" in name or "custom" in name) else {}
        if "jointst" in name:
            small.update(num_frames=2)
        m = iared.patch(iared.create_model(name, **small).eval(), policy="tome", r=2)
        shape = (2, m.config.in_chans) + ((2,) if "jointst" in name else ()) + tuple(m.patch_embed.img_size)
        out, info = m(torch.randn(shape), return_info=True)
        assert out.shape == (2, m.config.num_classes) and len(info.stages) == m.config.depth, name
        assert info.keep_ratio.max() < 1, name


def test_flops_on_vit_tiny():
    """Multiply-adds per image on vit_tiny_patch16_224 (unreduced 1.2537 G)."""
    torch.manual_seed(0)
    m = iared.create_model("vit_tiny_patch16_224").eval()
    x = torch.randn(1, 3, 224, 224)
    assert float(count_flops(m, x)[0]) / 1e9 == pytest.approx(1.2537, rel=1e-3)
    iared.patch(m, policy="tome")
    for r, gmacs in ((4, 1.092), (8, 0.929), (12, 0.773), (16, 0.625)):
        m.policy.r = r
        assert float(count_flops(m, x)[0]) / 1e9 == pytest.approx(gmacs, rel=0.01), r


# -- the CLI ------------------------------------------------------------------------------

class _TinyData(torch.utils.data.Dataset):
    """8 random 3x16x16 images, 4 classes."""

    def __init__(self, split, seed, mean=(0.0,) * 3, std=(1.0,) * 3):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        self.info = DataInfo(kind="tome_tiny", num_classes=4, class_names=tuple("abcd"), in_chans=3,
                             img_size=(16, 16), mean=tuple(mean), std=tuple(std), has_masks=False)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"image": self.x[i], "label": int(self.y[i])}


def _tiny16(policy=None, **kw):
    torch.manual_seed(0)
    m = iared.create_model("vit_custom", img_size=16, patch_size=4, embed_dim=16, depth=3, num_heads=2,
                           num_classes=4).eval()
    return iared.patch(m, policy, **kw) if policy else m


def test_eval_cli_runs_tome(tmp_path):
    register_dataset("tome_tiny", lambda path, split, seed, **kw: _TinyData(split, seed, **kw))
    try:
        ckpt = tmp_path / "m.safetensors"
        iared.save_model(_tiny16(), ckpt, arch="vit_custom", data={"kind": "tome_tiny", "mean": [0.0] * 3,
                                                                    "std": [1.0] * 3})
        out = tmp_path / "eval.json"
        argv = ["eval", "--data", "tome_tiny", "--checkpoint", str(ckpt), "--methods", "original,tome@8,tome@0",
                "--json", str(out), "--flops-images", "1", "--no-throughput", "--batch-size", "4"]
        assert main(argv) == 0
        res = json.loads(out.read_text())["methods"]
        assert res["tome@0"]["gflops_per_img"] == pytest.approx(res["original"]["gflops_per_img"])
        assert res["tome@0"]["top1"] == res["original"]["top1"]
        assert res["tome@8"]["gflops_per_img"] < res["original"]["gflops_per_img"]
        assert res["tome@8"]["keep_ratio"] < 1
    finally:
        DATASETS.pop("tome_tiny", None)


def test_interpret_cli_draws_merges(tmp_path, capsys):
    from PIL import Image

    ckpt = tmp_path / "tome.safetensors"
    iared.save_model(_tiny16("tome", r=2), ckpt, arch="vit_custom",
                     data={"kind": "x", "img_size": [16, 16], "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                           "class_names": list("abcd"), "num_classes": 4})
    img = tmp_path / "photo.png"
    Image.fromarray((torch.rand(20, 24, 3) * 255).byte().numpy(), "RGB").save(img)
    out = tmp_path / "out"
    assert main(["interpret", "--no-progress", "--device", "cpu", "-p", str(img), "-o", str(out),
                 "--checkpoint", str(ckpt)]) == 0, capsys.readouterr().err
    rec = json.loads((out / "photo" / "scores.json").read_text())
    assert (out / "photo" / "panel.png").stat().st_size > 0
    assert rec["scores"] is None and rec["groups"] == 3 and len(rec["keep"]) == 3
    owner = torch.tensor(rec["merged_into"]).reshape(-1)
    keep = torch.tensor(rec["keep"][-1]).reshape(-1).bool()
    assert torch.equal(keep, owner == torch.arange(16))     # survivors own their cell
    assert keep.sum() == 16 - 2 - 2 - 2 and rec["keep_ratio"] == pytest.approx(10 / 16)
