"""`iared.patch` on Hugging Face's ViT: conversion with copied weights (iared.integrations.hf)."""

import pytest
import torch

import iared
from iared.backbones.kernels import cpu_kernels

transformers = pytest.importorskip("transformers")
from iared.integrations.hf import from_hf, hf_config, key_pairs, to_hf  # noqa: E402

ATOL = 1e-5


def _config(**kw):
    """A tiny random ViT config (nothing downloaded)."""
    kw = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
          "image_size": 32, "patch_size": 8, "num_labels": 10, **kw}
    return transformers.ViTConfig(**kw)


def _hf(cls_name: str = "ViTForImageClassification", attn: str = "sdpa", seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(_config(**kw)).eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    else:  # transformers < 5
        model.config._attn_implementation = attn
    return model


def _images(batch: int = 2, size=(32, 32), seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _hf_out(model, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    # ViTModel: iared's model without head returns the final-normed class token (no pooler).
    return out.logits if hasattr(out, "logits") else out.last_hidden_state[:, 0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "ViTModel"])
def test_logits_equal_hf(cls_name, attn):
    model = _hf(cls_name, attn)
    assert model.config._attn_implementation == attn
    ours = from_hf(model)
    assert type(ours) is iared.VisionTransformer and ours.config.num_classes == (10 if "Class" in cls_name else 0)
    x = _images()
    with torch.inference_mode():
        ref, out = _hf_out(model, x), ours(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= ATOL


def test_eager_and_sdpa_agree():
    x = _images()
    with torch.inference_mode():
        eager, sdpa = (_hf_out(_hf(attn=a), x) for a in ("eager", "sdpa"))
    assert (eager - sdpa).abs().max().item() <= ATOL


def test_config_mapping():
    model = _hf(layer_norm_eps=1e-6, qkv_bias=False, num_channels=1, image_size=[16, 32], patch_size=8)
    c = hf_config(model)
    assert (c.norm_eps, c.qkv_bias, c.in_chans, c.img_size, c.patch_size) == (1e-6, False, 1, (16, 32), 8)
    assert (c.embed_dim, c.depth, c.num_heads, c.mlp_ratio, c.num_classes) == (64, 2, 4, 4.0, 10)
    ours = from_hf(model)
    x = torch.randn(2, 1, 16, 32)
    with torch.inference_mode():
        assert (ours(x) - model(pixel_values=x).logits).abs().max().item() <= ATOL


def test_key_mapping_covers_every_parameter_both_ways():
    model = _hf()
    pairs = key_pairs(model, hf_config(model))
    ours = from_hf(model)
    assert sorted(k for k, _ in pairs) == sorted(ours.state_dict())
    assert {k for _, hf in pairs for k in hf} == {n for n, _ in model.named_parameters()}
    qkv = dict(pairs)["blocks.1.attn.qkv.weight"]
    assert qkv in [  # transformers >= 5, < 5
        ("vit.layers.1.attention.q_proj.weight", "vit.layers.1.attention.k_proj.weight",
         "vit.layers.1.attention.v_proj.weight"),
        ("vit.encoder.layer.1.attention.attention.query.weight", "vit.encoder.layer.1.attention.attention.key.weight",
         "vit.encoder.layer.1.attention.attention.value.weight")]


@pytest.mark.parametrize("policy", ["ats", "random", "iared"])
def test_policies_on_an_hf_model(policy):
    model = _hf(num_hidden_layers=4, image_size=64)
    x = _images(size=(64, 64))
    with torch.inference_mode():
        ref = _hf_out(model, x)
    kw = {"groups": 2} if policy == "iared" else {}
    ours = iared.patch(model, policy=policy, **kw)
    assert ours is not model and ours.policy is not None

    logits, info = ours(x, return_info=True)        # eval: compact
    assert logits.shape == ref.shape and info.stages and torch.isfinite(logits).all()
    with torch.inference_mode(), cpu_kernels(ours):
        assert ours(x).shape == ref.shape
    ours.train()
    logits, info = ours(x, return_info=True)        # train: mask
    assert info.stages and torch.isfinite(logits).all()

    back = iared.unpatch(ours)
    assert back is model and ours.policy is None and back.training
    with torch.inference_mode():
        assert (_hf_out(back.eval(), x) - ref).abs().max().item() <= ATOL


def test_weights_are_copied_and_written_back():
    model = _hf()
    ours = iared.patch(model, policy="ats")
    q_name, _, v_name = dict(key_pairs(model, ours.config))["blocks.1.attn.qkv.bias"]
    assert ours.blocks[1].attn.qkv.bias.data_ptr() != model.get_parameter(q_name).data_ptr()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))       # e.g. fine-tuning: HF's copy is untouched ...
    x = _images()
    with torch.inference_mode():
        before = _hf_out(model, x)
        iared.unpatch(ours)
        trained = ours(x)
        assert (trained - before).abs().max().item() > 1e-3
        assert (_hf_out(model, x) - trained).abs().max().item() <= ATOL  # ... until written back
    q, k, v = ours.blocks[1].attn.qkv.bias.chunk(3)
    assert torch.equal(model.get_parameter(v_name), v)


def test_vit_model_pooler_is_left_alone():
    model = _hf("ViTModel")
    pooler = model.pooler.dense.weight.clone()
    ours = from_hf(model)
    assert not any("pooler" in k for k in ours.state_dict())
    assert to_hf(ours) is model and torch.equal(model.pooler.dense.weight, pooler)


def test_to_hf_of_a_native_model():
    ours = iared.create_model("vit_custom", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                              num_classes=5, norm_eps=1e-12).eval()
    model = to_hf(ours).eval()
    assert type(model).__name__ == "ViTForImageClassification" and model.config.num_labels == 5
    x = _images()
    with torch.inference_mode():
        assert (_hf_out(model, x) - ours(x)).abs().max().item() <= ATOL
    headless = to_hf(iared.create_model("vit_custom", img_size=32, patch_size=8, embed_dim=64, depth=2,
                                        num_heads=4, num_classes=0))
    assert type(headless).__name__ == "ViTModel" and headless.pooler is None
    with pytest.raises(ValueError, match="distillation token"):
        to_hf(iared.create_model("vit_custom", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4,
                                 distilled=True))
    with pytest.raises(ValueError, match="overlapping patches"):
        to_hf(iared.create_model("vit_custom", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4,
                                 patch_overlap=2))
    with pytest.raises(ValueError, match="differs"):
        to_hf(ours, _hf())  # 10 labels vs 5


@pytest.mark.parametrize("kwargs, feature", [
    ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ({"hidden_dropout_prob": 0.1}, "dropout"),
    ({"attention_probs_dropout_prob": 0.1}, "dropout"),
])
def test_unsupported_hf_settings_are_refused(kwargs, feature):
    with pytest.raises(ValueError, match="cannot convert") as err:
        iared.patch(_hf(**kwargs), policy="ats")
    assert feature in str(err.value)


def test_unsupported_hf_classes_are_refused():
    model = transformers.ViTForMaskedImageModeling(_config(encoder_stride=8)).eval()
    with pytest.raises(TypeError, match="ViTModel or ViTForImageClassification"):
        iared.patch(model, policy="ats")
