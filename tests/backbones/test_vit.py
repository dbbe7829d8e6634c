"""The ViT/DeiT backbone (`iared.backbones.vit`): image and input shapes, timm's state-dict layout,
the distilled head."""

import contextlib

import pytest
import torch

from iared.backbones import create_model


def test_image_size_must_be_a_multiple_of_the_patch():
    # a strided convolution would drop the last pixels silently; the packed patch embedding
    # of `cpu_kernels` could not even reshape them
    with pytest.raises(ValueError, match="not a positive multiple of the patch size"):
        create_model("deit_tiny_patch16_224", img_size=100)
    with pytest.raises(ValueError, match="multiple"):
        create_model("vit_custom", img_size=(32, 30), patch_size=4, embed_dim=8, depth=1, num_heads=2)
    assert create_model("vit_custom", img_size=(32, 28), patch_size=4, embed_dim=8, depth=1,
                        num_heads=2).patch_embed.grid_size == (8, 7)


@pytest.mark.parametrize("packed", [False, True])
def test_wrong_input_shape_is_one_clear_error(packed):
    from iared.backbones.kernels import cpu_kernels

    m = create_model("vit_custom", img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2).eval()
    with torch.inference_mode(), (cpu_kernels(m) if packed else contextlib.nullcontext()):
        for shape in [(1, 1, 16, 16), (3, 16, 16), (1, 3, 12, 16)]:
            with pytest.raises(ValueError, match=r"does not match the model's images \(B, 3, 16, 16\)"):
                m(torch.randn(*shape))
        with pytest.raises(ValueError, match="execution must be"):
            m(torch.randn(1, 3, 16, 16), execution="dropped")


def test_timm_state_dict_layout():
    sd = create_model("deit_small_distilled_patch16_224").state_dict()
    expected = {"cls_token", "dist_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias", "head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    for i in range(12):
        for part in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    assert set(sd) == expected
    assert sd["pos_embed"].shape == (1, 198, 384)
    assert sd["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (1536, 384)


def test_distilled_averages_heads():
    torch.manual_seed(0)
    m = create_model("deit_tiny_distilled_patch16_224", depth=1).eval()
    x = torch.randn(2, 3, 224, 224)
    t = m.embed(x)
    for blk in m.blocks:
        t = blk(t)
    feats = m.norm(t.x)
    expected = (m.head(feats[:, 0]) + m.head_dist(feats[:, 1])) / 2
    assert torch.allclose(m(x), expected)


def test_overlapping_patches_keep_the_grid_and_every_execution_path(tmp_path):
    import iared
    from iared.backbones.kernels import cpu_kernels

    torch.manual_seed(0)
    m = create_model("vit_custom", img_size=24, patch_size=6, in_chans=1, embed_dim=16, depth=2, num_heads=2,
                     num_classes=3, patch_overlap=2).eval()
    assert m.patch_embed.grid_size == (4, 4) and m.patch_embed.proj.weight.shape == (16, 1, 10, 10)
    x = torch.randn(2, 1, 24, 24)
    # token (0, 1) sees pixels rows -2..7, columns 4..13 of the zero-padded image
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    w, b = m.patch_embed.proj.weight, m.patch_embed.proj.bias
    expect = torch.einsum("bchw,dchw->bd", padded[:, :, 0:10, 6:16], w) + b
    torch.testing.assert_close(m.patch_embed(x)[:, 1], expect, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        ref = m(x)
        with cpu_kernels(m):  # the packed patch embedding only serves non-overlapping patches
            torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    iared.save_model(m, tmp_path / "m.safetensors", arch="vit_custom")
    back = iared.load_model(tmp_path / "m.safetensors").eval()
    assert back.config.patch_overlap == 2
    with torch.inference_mode():
        torch.testing.assert_close(back(x), ref)
    with pytest.raises(ValueError, match="overlap"):
        create_model("vit_custom", img_size=24, patch_size=6, embed_dim=8, depth=1, num_heads=2, patch_overlap=-1)
