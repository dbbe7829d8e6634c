"""Heatmap methods: the pure math on hand-made attention stacks, the forwards against the
model's own, GradCAM on a constructed toy, IA-RED² scores through a fake policy."""

import pytest
import torch
from torch import nn

from iared.backbones import StageRecord, create_model
from iared.evaluation.heatmaps import (
    METHODS,
    attention_rollout,
    chefer_relevance,
    explain,
    forward_with_attention,
)
from iared.backbones.tokens import Tokens, apply_keep, to_grid

BASELINES = ("attention", "rollout", "gradcam", "chefer")


def tiny_vit(distilled: bool = False, depth: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("vit_custom", img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=depth,
                        num_heads=2, num_classes=5, distilled=distilled).eval()


def images(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


# -- pure math ----------------------------------------------------------------------------


def test_attention_rollout_hand_computed():
    # L = 3 (CLS, p1, p2), 2 heads.
    # Block 1: heads I and [[0,.5,.5],[0,1,0],[0,0,1]] -> mean [[.5,.25,.25],[0,1,0],[0,0,1]];
    #   (mean + I) / 2 = [[.75,.125,.125],[0,1,0],[0,0,1]].
    # Block 2: both heads [[0,1,0],[.5,.5,0],[0,0,1]] -> (A + I) / 2 = [[.5,.5,0],[.25,.75,0],[0,0,1]].
    # Rollout = Â2 Â1, CLS row = .5 * [.75,.125,.125] + .5 * [0,1,0] = [.375, .5625, .0625].
    eye = torch.eye(3)
    head_b = torch.tensor([[0, .5, .5], [0, 1, 0], [0, 0, 1]])
    a1 = torch.stack([eye, head_b])[None]
    a2_head = torch.tensor([[0, 1, 0], [.5, .5, 0], [0, 0, 1]])
    a2 = torch.stack([a2_head, a2_head])[None]
    out = attention_rollout([a1, a2])
    assert torch.allclose(out, torch.tensor([[.5625, .0625]]))
    # With two prefix tokens only the last column is a patch.
    assert torch.allclose(attention_rollout([a1, a2], num_prefix=2), torch.tensor([[.0625]]))
    # The order matters: Â1 Â2 (blocks fed in reverse, or multiplied on the wrong side)
    # gives [.46875, .125].
    assert not torch.allclose(attention_rollout([a2, a1]), out)


def test_chefer_relevance_hand_computed():
    # Block 1, 2 heads, same A = [[.5,.5,0],[0,1,0],[0,0,1]]:
    #   head a grad row0 [2,2,0] -> (G*A)+ row0 [1,1,0]; head b grad row0 [-2,2,0] -> [0,1,0];
    #   Ā1 = [[.5,1,0],0,0]; R1 = I + Ā1 = [[1.5,1,0],[0,1,0],[0,0,1]].
    # Block 2, A row0 = [1/3]*3, grad row0 = 1.5 -> Ā2 row0 = [.5,.5,.5], other rows 0;
    #   Ā2 R1 row0 = .5*[1.5,1,0] + .5*[0,1,0] + .5*[0,0,1] = [.75,1,.5];
    #   R2 row0 = [1.5,1,0] + [.75,1,.5] = [2.25, 2, .5] -> patches [2, .5].
    a = torch.tensor([[.5, .5, 0], [0, 1, 0], [0, 0, 1]])
    ga = torch.zeros(3, 3)
    ga[0] = torch.tensor([2., 2., 0.])
    gb = torch.zeros(3, 3)
    gb[0] = torch.tensor([-2., 2., 0.])
    a2 = torch.tensor([[1 / 3] * 3, [0, 1, 0], [0, 0, 1]])
    g2 = torch.zeros(3, 3)
    g2[0] = 1.5
    attns = [torch.stack([a, a])[None], torch.stack([a2, a2])[None]]
    grads = [torch.stack([ga, gb])[None], torch.stack([g2, g2])[None]]
    # (R + R Ā, the wrong side, would give [1.75, .75].)
    assert torch.allclose(chefer_relevance(attns, grads), torch.tensor([[2.0, 0.5]]))
    assert torch.allclose(chefer_relevance(attns, grads, num_prefix=2), torch.tensor([[0.5]]))


# -- forwards -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plain", "distilled", "vit_mnist_patch7_28"])
def test_forward_with_attention_reproduces_model(name):
    if name == "vit_mnist_patch7_28":  # other attention scale, no final norm, two-layer head
        torch.manual_seed(0)
        model, x = create_model(name).eval(), torch.randn(2, 1, 28, 28)
    else:
        model, x = tiny_vit(distilled=name == "distilled"), images()
    logits, attns = forward_with_attention(model, x)
    assert len(attns) == len(model.blocks)
    assert torch.allclose(logits, model(x), atol=1e-5, rtol=1e-5)
    # with track_grad the same numbers come out, and the attentions carry a graph
    logits_g, attns_g = forward_with_attention(model, x, track_grad=True)
    assert torch.allclose(logits_g, logits) and all(a.requires_grad for a in attns_g)


@pytest.mark.parametrize("distilled", [False, True])
@pytest.mark.parametrize("block", [0, 1, 2])
def test_raw_attention_equals_manual(distilled, block):
    model, x = tiny_vit(distilled), images()
    P = model.num_prefix_tokens
    tokens = model.embed(x)
    for blk in model.blocks[:block]:
        tokens = blk(tokens)
    h = model.blocks[block].norm1(tokens.x)
    attn_mod = model.blocks[block].attn
    B, L, D = h.shape
    qkv = (h @ attn_mod.qkv.weight.T + attn_mod.qkv.bias).reshape(B, L, 3, 2, D // 2)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, H, L, hd)
    probs = torch.softmax(q @ k.transpose(-1, -2) / (D // 2) ** 0.5, dim=-1)
    expected = probs[:, :, 0, P:].mean(dim=1)
    got = explain(model, x, "attention", block=block)
    assert got.shape == (2, model.grid_size)
    assert torch.allclose(got, expected, atol=1e-6)
    if block == 1:
        assert torch.equal(explain(model, x, "attention"), got)  # Block_1 is the default


# -- GradCAM ------------------------------------------------------------------------------


def test_gradcam_constructed_toy_highlights_the_one_patch():
    """One block, uniform attention (W_q = 0), no MLP, no final norm, zero embeddings and
    biases, a two-class head with rows h and -h, and an image that is zero except patch k.

    Then every token but patch k is the zero vector, whose LayerNorm is 0, so the target
    logit is linear in patch k's `norm1` output A_k: logit = g . A_k, with the same
    gradient g for every patch (uniform attention). GradCAM's channel weights are g and its
    map is ReLU(g . A_j): 0 for every other patch and, at patch k, the predicted class's
    logit, which is >= 0 because the two logits are t and -t."""
    torch.manual_seed(0)
    model = create_model("vit_custom", img_size=8, patch_size=2, in_chans=1, embed_dim=8, depth=1,
                         num_heads=2, num_classes=2, final_norm=False, qkv_bias=False).eval()
    with torch.no_grad():
        for p in (model.pos_embed, model.cls_token, model.patch_embed.proj.bias, model.head.bias,
                  model.blocks[0].mlp.fc2.weight, model.blocks[0].mlp.fc2.bias):
            p.zero_()
        model.blocks[0].attn.qkv.weight[:8].zero_()  # W_q = 0: every query attends uniformly
        model.head.weight[1] = -model.head.weight[0]
    k = 6  # patch (row 1, col 2) of the 4x4 grid
    x = torch.zeros(3, 1, 8, 8)
    x[:, :, 2:4, 4:6] = torch.randn(3, 1, 2, 2)
    cam = explain(model, x, "gradcam")
    logits = model(x)
    assert cam.shape == (3, 16)
    others = torch.ones(16, dtype=torch.bool)
    others[k] = False
    assert torch.all(cam[:, others] == 0)
    assert torch.allclose(cam[:, k], logits.max(dim=-1).values, atol=1e-6)
    assert torch.all(cam[:, k] > 0)
    # Asking for the other class: its logit at patch k is negative, so ReLU leaves nothing.
    assert torch.all(explain(model, x, "gradcam", target=logits.argmin(-1)) == 0)


@pytest.mark.parametrize("distilled", [False, True])
def test_gradcam_matches_autograd_reference(distilled):
    """captum's LayerGradCam through our adapter equals GradCAM written out with autograd."""
    model, x = tiny_vit(distilled), images(3)
    P, G = model.num_prefix_tokens, model.grid_size
    # reference: the last block's norm1 output as the feature map
    tokens = model.embed(x)
    for blk in model.blocks[:-1]:
        tokens = blk(tokens)
    last = model.blocks[-1]
    h = last.norm1(tokens.x.detach()).detach().requires_grad_(True)
    y = tokens.x.detach() + last.attn(h)
    y = y + last.mlp(last.norm2(y))
    logits = model.forward_head(tokens.with_x(y))
    target = logits.argmax(-1)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), h)
    weights = grad[:, P:].mean(dim=1, keepdim=True)                 # (B, 1, D)
    expected = torch.relu((weights * h[:, P:]).sum(-1)).detach()    # (B, G)
    got = explain(model, x, "gradcam")
    assert got.shape == (3, G)
    assert expected.abs().max() > 0
    assert torch.allclose(got, expected, atol=1e-6)


# -- side effects, shapes, other models ---------------------------------------------------


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.mark.parametrize("method", ["gradcam", "chefer"])
@pytest.mark.parametrize("frozen", [False, True])
def test_gradient_methods_leave_no_trace(method, frozen):
    model, x = tiny_vit(distilled=True), images()
    model.train()  # the call evaluates in eval mode and restores this
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = explain(model, x, method)
    assert out.shape == (2, model.grid_size) and not out.requires_grad
    assert torch.all(out >= 0) and out.sum() > 0
    assert model.training
    assert _hook_count(model) == 0
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert p.requires_grad == before[n], n
        assert torch.equal(p, state[n]), n


@pytest.mark.parametrize("distilled", [False, True])
def test_all_baselines_shapes_and_signs(distilled):
    model, x = tiny_vit(distilled), images()
    for method in BASELINES:
        h = explain(model, x, method)
        assert h.shape == (2, model.grid_size), method
        assert torch.isfinite(h).all() and torch.all(h >= 0), method
    # chefer on another target gives another map
    assert not torch.allclose(explain(model, x, "chefer", target=0), explain(model, x, "chefer", target=1))


def test_foreign_checkpoint_architecture():
    torch.manual_seed(0)
    model = create_model("vit_tiny8_patch4_32").eval()
    x = torch.randn(2, 3, 32, 32)
    for method in ("rollout", "chefer"):
        h = explain(model, x, method)
        assert h.shape == (2, 64) and torch.isfinite(h).all() and torch.all(h >= 0)


def test_bad_arguments():
    model, x = tiny_vit(), images()
    with pytest.raises(ValueError, match="unknown heatmap method"):
        explain(model, x, "lime")
    with pytest.raises(ValueError, match="out of range"):
        explain(model, x, "attention", block=3)
    with pytest.raises(ValueError, match="policy"):
        explain(model, x, "iared")
    n, classes = x.shape[0], model.config.num_classes
    for method in ("gradcam", "chefer"):
        # a target per image or one for all; a wrong count used to broadcast silently
        with pytest.raises(ValueError, match="one class per image"):
            explain(model, x, method, target=torch.zeros(n + 1, dtype=torch.long))
        with pytest.raises(ValueError, match="target classes must be in"):
            explain(model, x, method, target=classes)
        one = explain(model, x, method, target=1)
        assert torch.equal(one, explain(model, x, method, target=torch.ones(n, dtype=torch.long)))


# -- IA-RED² scores through a fake policy -------------------------------------------------


class FakeGroupedPolicy(nn.Module):
    """The policy signature with made-up scores: sigmoid of each token's mean feature,
    scored in front of `stage_blocks`, tokens below 0.5 dropped."""

    def __init__(self, stage_blocks=(0, 2)):
        super().__init__()
        self.stage_blocks = stage_blocks

    def forward(self, index: int, tokens: Tokens, model: nn.Module, mode=None):
        if index not in self.stage_blocks:
            return tokens, None
        G, P = model.grid_size, tokens.num_prefix
        s = torch.sigmoid(4 * tokens.x[:, P:].mean(-1))  # (B, N)
        keep = s > 0.5
        rec = StageRecord(block=index,
                          entering=to_grid(torch.ones_like(s), tokens, G).bool(),
                          keep=to_grid((keep & tokens.patch_valid).float(), tokens, G).bool(),
                          scores=to_grid(s, tokens, G))  # dropped earlier -> 0
        return apply_keep(tokens, keep), rec


def test_iared_scores_from_policy_records():
    model, x = tiny_vit(distilled=True, depth=4), images(3)
    plain = tiny_vit(distilled=True, depth=4)
    model.policy = FakeGroupedPolicy()
    _, info = model(x, return_info=True)
    got = explain(model, x, "iared")
    assert torch.equal(got, info.stages[1].scores)
    all_groups = explain(model, x, "iared", group=None)
    assert len(all_groups) == 2 and torch.equal(all_groups[0], info.stages[0].scores)
    # tokens dropped by group 0 score 0 at group 1, and something was dropped
    dropped = ~info.stages[0].keep
    assert dropped.any() and torch.all(got[dropped] == 0)
    with pytest.raises(ValueError, match="out of range"):
        explain(model, x, "iared", group=2)
    # the baselines explain the unreduced backbone: the policy is not called
    for method in BASELINES:
        assert torch.allclose(explain(model, x, method), explain(plain, x, method)), method


def test_methods_list_is_what_explain_accepts():
    assert set(METHODS) == set(BASELINES) | {"iared"}


def test_iared_scores_with_the_real_policy():
    """The same contract through `iared.patch(model, policy="iared")` (the lead's policy)."""
    import iared

    model, x = tiny_vit(depth=6), images()
    iared.patch(model, policy="iared", groups=3)
    _, info = model(x, return_info=True)
    groups = explain(model, x, "iared", group=None)
    assert len(groups) == 3
    for g, stage in zip(groups, info.stages):
        assert g.shape == (2, model.grid_size) and torch.all((g >= 0) & (g <= 1))
        assert torch.equal(g, stage.scores.float())
