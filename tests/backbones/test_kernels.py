"""oneDNN inference kernels (`iared.backbones.kernels`): same logits, training untouched.

Not timed: the speed of the kernels is measured by `iared bench speed` (its JSON records
which kernels ran).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import iared
from iared.backbones.kernels import cpu_kernels, onednn_available, resolve_kernels
from iared.backbones.native import native_module
from iared.backbones.vit import Mlp, PatchEmbed

from helpers import FixedKeep, tiny_model, uneven_keeps

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="PyTorch's oneDNN linear ops are not available")
needs_onednn_bf16 = pytest.mark.skipif(not onednn_available(torch.bfloat16),
                                       reason="no oneDNN bf16 linear here (the CPU lacks native bf16)")


FAST = "native" if onednn_available() and native_module() is not None else "onednn"  # what "auto" picks here


def _patched(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "forward" in vars(m)]


@needs_onednn
def test_packed_batch_with_uneven_counts_matches_masked_reference():
    model = tiny_model()
    B = 6
    model.policy = FixedKeep(uneven_keeps(B, model.grid_size, [0, 2, 4]))  # image 1 keeps only CLS
    x = torch.randn(B, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x, execution="mask")
        plain = model(x, execution="compact")
        with cpu_kernels(model) as used:
            fast = model(x, execution="compact")
            model.policy.rows = torch.tensor([1])  # the CLS-only image alone
            alone = model(x[1:2], execution="compact")
    assert used == FAST
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, ref[1:2], rtol=1e-4, atol=1e-5)


@needs_onednn
def test_every_linear_is_packed_and_mlp_fused_then_restored():
    model = iared.patch(tiny_model(), "iared", groups=3)  # the interpreters' linears too
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    mlps = [m for m in model.modules() if type(m) in (Mlp, PatchEmbed)]
    keys = set(model.state_dict())
    with cpu_kernels(model):
        patched = _patched(model)
        assert set(map(id, linears + mlps)) <= set(map(id, patched))
        assert len(mlps) == len(model.blocks) + 1
    assert _patched(model) == []
    assert set(model.state_dict()) == keys


@needs_onednn
def test_interpreter_scores_fused_then_restored():
    torch.manual_seed(0)
    model = iared.patch(tiny_model(), "iared", groups=3)
    interpreters = list(model.policy.interpreters)
    with torch.no_grad():  # scores spread over (0, 1), not all near init_keep
        for it in interpreters:
            it.q.weight.normal_(std=0.3)
    x = torch.randn(3, 3, 32, 32)
    patches = torch.randn(3, 7, model.embed_dim)
    with torch.inference_mode():
        ref_scores = [it.informative(patches) for it in interpreters]
        _, ref = model(x, return_info=True)
        with cpu_kernels(model, "onednn"):
            assert all("informative" in vars(it) for it in interpreters)
            fused = [it.informative(patches) for it in interpreters]
            _, fast = model(x, return_info=True)
    assert not any("informative" in vars(it) for it in interpreters)
    for a, b in zip(fused, ref_scores):
        assert a.dtype == torch.float32 and a.shape == (3, 7)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for s_ref, s_fast in zip(ref.stages, fast.stages):
        torch.testing.assert_close(s_fast.scores, s_ref.scores, rtol=0, atol=1e-6)
        clear = (s_ref.scores - 0.5).abs() > 1e-5  # decisions agree wherever a score is not on the threshold
        assert torch.equal(s_fast.keep[clear], s_ref.keep[clear])


@needs_onednn
def test_iared_and_ats_logits_unchanged():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    for policy, kwargs in (("iared", {"groups": 3}), ("ats", {})):
        model = iared.patch(tiny_model(), policy, **kwargs)
        with torch.inference_mode():
            ref = model(x)
            with cpu_kernels(model, "onednn"):
                fast = model(x)
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_jointst_logits_unchanged():
    torch.manual_seed(0)
    model = iared.create_model("jointst_custom", img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2,
                               num_heads=4, num_classes=5).eval()
    clips = torch.randn(2, 3, 4, 32, 32)
    with torch.inference_mode():
        ref = model(clips)
        with cpu_kernels(model):
            fast = model(clips)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_autograd_falls_back_to_the_module_weights():
    model = tiny_model().train()
    x = torch.randn(2, 3, 32, 32)
    with cpu_kernels(model):
        model(x).sum().backward()
        # A weight changed inside the context is used at once: the fallback reads the module.
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.fill_(1.0)
        with torch.enable_grad():
            out = model(x)
    assert model.blocks[0].mlp.fc1.weight.grad is not None
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out, torch.ones_like(out))


def test_aten_leaves_the_model_alone():
    model = tiny_model()
    with cpu_kernels(model, "aten") as used:
        assert _patched(model) == []
    assert used == "aten"


def test_resolve_kernels_names_and_devices():
    assert resolve_kernels("aten") == "aten"
    assert resolve_kernels("auto", "meta") == "aten"
    with pytest.raises(ValueError, match="kernels must be one of"):
        resolve_kernels("mkl")
    with pytest.raises(ValueError, match="not available on meta"):
        resolve_kernels("onednn", "meta")
    assert resolve_kernels("auto") == (FAST if onednn_available() else "aten")


@needs_onednn
def test_patch_embedding_as_linear_on_rectangular_one_channel_images():
    torch.manual_seed(0)
    model = iared.create_model("vit_custom", img_size=(32, 48), patch_size=8, in_chans=1, embed_dim=32, depth=1,
                               num_heads=4, num_classes=3).eval()
    x = torch.randn(2, 1, 32, 48)
    with torch.inference_mode():
        ref = model.patch_embed(x)
        with cpu_kernels(model):
            assert "forward" in vars(model.patch_embed)
            torch.testing.assert_close(model.patch_embed(x), ref, rtol=1e-4, atol=1e-5)
            with pytest.raises(ValueError, match="does not match"):
                model(torch.randn(1, 1, 48, 32))


@needs_onednn_bf16
def test_bfloat16_model_runs_onednn_bf16_and_keeps_uneven_counts_exact():
    model = tiny_model().to(torch.bfloat16)
    B = 6
    model.policy = FixedKeep(uneven_keeps(B, model.grid_size, [0, 2, 4]))  # image 1 keeps only CLS
    x = torch.randn(B, 3, 32, 32).to(torch.bfloat16)
    with torch.inference_mode():
        ref = model(x, execution="mask")
        plain = model(x, execution="compact")
        with cpu_kernels(model) as used:
            assert len(_patched(model)) > len(model.blocks)  # bf16 layers are packed too
            fast = model(x, execution="compact")
    assert used == FAST and fast.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: paths that round in other places agree to about 1e-2
    torch.testing.assert_close(fast.float(), ref.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(fast.float(), plain.float(), rtol=3e-2, atol=3e-2)


def test_resolve_kernels_in_bfloat16():
    want = FAST if onednn_available(torch.bfloat16) else "aten"
    assert resolve_kernels("auto", "cpu", torch.bfloat16) == want
    if want == "aten":
        with pytest.raises(ValueError, match="in bfloat16"):
            resolve_kernels("onednn", "cpu", torch.bfloat16)
