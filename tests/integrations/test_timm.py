"""`iared.patch` on timm's own ViT / DeiT: conversion with shared weights (iared.integrations.timm)."""

import copy
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import iared
from iared.backbones.kernels import cpu_kernels

timm = pytest.importorskip("timm")
from iared.integrations.timm import from_timm, timm_config, to_timm  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY_WEIGHTS = REPO.parent / "shared" / "models" / "vit_tiny_patch16_224_augreg_in1k.safetensors"
ATOL = 1e-5

# Every registry name that timm also has: each new one is tested by the code below.
MIRRORED = sorted(set(iared.list_models()) & set(timm.list_models()))


def _small(name: str = "vit_tiny_patch16_224", **kw):
    """A fast timm model (2 blocks, 64x64 images) in eval mode."""
    kw = {"img_size": 64, "depth": 2, **kw}
    return timm.create_model(name, pretrained=False, **kw).eval()


def _images(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_import_iared_imports_neither_timm_nor_transformers():
    code = ("import sys, iared, iared.patch, iared.integrations; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'transformers')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_mirrored_archs_are_the_expected_ones():
    assert {"vit_tiny_patch16_224", "deit_small_distilled_patch16_224", "deit_base_patch16_384"} <= set(MIRRORED)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if "base" in n else n for n in MIRRORED])
def test_logits_equal_timm(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    ours = from_timm(model)
    assert type(ours) is iared.VisionTransformer
    with torch.device("meta"):  # the config read off timm is the registry's (meta: no weights to init)
        assert ours.config == iared.create_model(name).config
    x = _images(model)
    with torch.inference_mode():
        ref, out = model(x), ours(x)
    assert (out - ref).abs().max().item() <= ATOL


def test_other_resolution_and_eps():
    model = _small(img_size=96, norm_layer=functools.partial(timm.layers.LayerNorm, eps=1e-5))
    ours = iared.patch(model, policy="ats")
    assert ours.config.img_size == 96 and ours.grid_size == 36 and ours.config.norm_eps == 1e-5
    x = _images(model)
    with torch.inference_mode():
        ref = model(x)
        iared.unpatch(ours)
        assert (ours(x) - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("kwargs", [
    {"img_size": (32, 64)}, {"patch_size": 8}, {"in_chans": 1}, {"num_classes": 0}, {"final_norm": False},
    {"qkv_bias": False}, {"mlp_ratio": 3.0}, {"embed_dim": 96, "num_heads": 4}, {"act_layer": "gelu"},
])
def test_variants_convert_exactly(kwargs):
    model = _small(**kwargs)
    ours = from_timm(model)
    x = torch.randn(2, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    with torch.inference_mode():
        ref, out = model(x), ours(x)
    assert out.shape == ref.shape and (out - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("policy", ["ats", "random", "iared"])
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_policies_on_a_timm_model(policy, name):
    model = _small(name, depth=4)
    x = _images(model)
    with torch.inference_mode():
        ref = model(x)
    kw = {"groups": 2} if policy == "iared" else {}
    ours = iared.patch(model, policy=policy, **kw)
    assert ours is not model and ours.policy is not None
    assert iared.patch(ours, policy=policy, **kw) is ours  # our own model: patched in place

    ours.eval()
    logits, info = ours(x, return_info=True)  # compact: tokens really removed
    assert logits.shape == ref.shape and torch.isfinite(logits).all()
    assert info.block_tokens.shape == (2, 4) and info.stages
    with torch.inference_mode(), cpu_kernels(ours):
        fast = ours(x)
    assert fast.shape == ref.shape and torch.isfinite(fast).all()

    ours.train()
    logits, info = ours(x, return_info=True)  # mask: shapes kept, dropped tokens masked
    assert info.stages and torch.isfinite(logits).all()
    logits.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None  # timm's parameter is the one trained

    back = iared.unpatch(ours)
    assert back is model and ours.policy is None
    assert back.training  # in the mode the iared model was in
    with torch.inference_mode():
        assert (back.eval()(x) - ref).abs().max().item() <= ATOL


def test_weights_are_shared_both_ways():
    model = _small()
    ours = from_timm(model)
    timm_params = dict(model.named_parameters())
    for name, p in ours.named_parameters():
        assert p is timm_params[name], name
    with torch.no_grad():
        ours.blocks[1].mlp.fc2.bias.add_(1.0)  # change ours: timm sees it
    assert torch.equal(model.blocks[1].mlp.fc2.bias, ours.blocks[1].mlp.fc2.bias)
    x = _images(model)
    with torch.no_grad():
        model.head.weight.mul_(2.0)            # change timm: ours sees it
        assert (ours(x) - model(x)).abs().max().item() <= ATOL
    # Loading a state dict into either model fills both.
    sd = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    ours.load_state_dict(sd)
    assert torch.equal(model.pos_embed, sd["pos_embed"])


def test_sharing_survives_dtype_change_and_deepcopy():
    model = _small()
    ours = from_timm(model).double()
    assert model.cls_token.dtype == torch.float64 and model.cls_token is ours.cls_token
    copied = copy.deepcopy(ours)
    assert copied.cls_token is not ours.cls_token
    assert to_timm(copied).cls_token is copied.cls_token  # the copy carries its own timm model


def test_to_timm_of_a_native_model():
    ours = iared.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=2).eval()
    ours.pretrained_cfg = {"mean": (0.5, 0.5, 0.5)}
    model = to_timm(ours)
    assert type(model).__name__ == "VisionTransformerDistilled"
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert model.pos_embed is ours.pos_embed and not model.training
    x = _images(model)
    with torch.inference_mode():
        assert (model(x) - ours(x)).abs().max().item() <= ATOL
    with pytest.raises(ValueError, match="two-layer head"):
        to_timm(iared.create_model("vit_mnist_patch7_28"))
    with pytest.raises(ValueError, match="overlapping patches"):
        to_timm(iared.create_model("vit_custom", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4,
                                   patch_overlap=2))
    with pytest.raises(TypeError, match="iared VisionTransformer"):
        to_timm(model)


def test_pretrained_cfg_is_carried():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1)
    ours = from_timm(model)
    assert isinstance(ours.pretrained_cfg, dict)
    for key in ("mean", "std", "interpolation", "crop_pct", "input_size", "crop_mode"):
        assert ours.pretrained_cfg[key] == model.pretrained_cfg[key], key
    assert ours.pretrained_cfg is not model.pretrained_cfg


@pytest.mark.parametrize("kwargs, feature", [
    ({"reg_tokens": 4}, "register tokens"),
    ({"class_token": False, "global_pool": "avg"}, "no class token"),
    ({"no_embed_class": True}, "no_embed_class"),
    ({"global_pool": "avg"}, "global_pool='avg'"),
    ({"global_pool": "map"}, "global_pool='map'"),
    ({"fc_norm": True}, "fc_norm"),
    ({"pre_norm": True}, "pre_norm"),
    ({"qk_norm": True}, "qk_norm"),
    ({"init_values": 1e-5}, "LayerScale"),
    ({"act_layer": "gelu_tanh"}, "activation GELUTanh"),
    ({"act_layer": "silu"}, "activation"),
    ({"dynamic_img_size": True}, "dynamic_img_size"),
    ({"dynamic_img_pad": True}, "fixed image size"),
    ({"drop_path_rate": 0.1}, "drop path"),
    ({"drop_rate": 0.1}, "dropout"),
    ({"attn_drop_rate": 0.1}, "dropout"),
    ({"pos_embed": "none"}, "no position embedding"),
    ({"norm_layer": "rmsnorm"}, "norm layer RmsNorm"),
    ({"proj_bias": False}, "proj_bias=False"),
])
def test_unsupported_timm_features_are_refused(kwargs, feature):
    model = _small(**kwargs)
    with pytest.raises(ValueError, match="cannot convert timm") as err:
        iared.patch(model, policy="ats")
    assert feature in str(err.value)


def test_unsupported_timm_classes_are_refused():
    with pytest.raises(TypeError, match="not timm's VisionTransformer"):
        iared.patch(timm.create_model("resnet10t", pretrained=False), policy="ats")
    with pytest.raises(TypeError, match="not timm's VisionTransformer"):
        timm_config(iared.create_model("vit_tiny8_patch4_32"))
    model = _small("deit_tiny_distilled_patch16_224")
    model.set_distilled_training(True)
    with pytest.raises(ValueError, match="distilled_training"):
        from_timm(model)
    with pytest.raises(ValueError, match="distilled model without classifier"):
        from_timm(_small("deit_tiny_distilled_patch16_224", num_classes=0))


def test_unpatch_of_a_timm_model_never_converted():
    model = _small()
    assert iared.unpatch(model) is model


def test_real_checkpoint_through_timm():
    if not TINY_WEIGHTS.is_file():
        pytest.skip("needs ../shared/models/vit_tiny_patch16_224_augreg_in1k.safetensors")
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    model.load_state_dict(load_file(str(TINY_WEIGHTS)), strict=True)
    model.eval()
    ours = iared.patch(model, policy="ats")
    iared.unpatch(ours)
    x = _images(model)
    with torch.inference_mode():
        ref = model(x)
        out = ours(x)
        with cpu_kernels(ours):
            fast = ours(x)
    assert (out - ref).abs().max().item() <= ATOL
    assert (fast - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()  # oneDNN sums in another order
    # And the same file through iared's own loader gives the same model.
    native = iared.load_pretrained(iared.create_model("vit_tiny_patch16_224"), TINY_WEIGHTS).eval()
    with torch.inference_mode():
        assert (native(x) - ref).abs().max().item() <= ATOL
