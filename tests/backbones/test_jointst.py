"""JointST video ViT: equivalence with a plain reference, TimeSformer token order, loading."""

import math

import pytest
import torch
import torch.nn.functional as F

import iared
from iared.backbones.checkpoint import load_pretrained
from iared.backbones.jointst import JointSTViT, frame_maps, resample_time_embed

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_frames=3, embed_dim=32, depth=2, num_heads=4,
            num_classes=5)


def tiny(**kw) -> JointSTViT:
    torch.manual_seed(0)
    return iared.create_model("jointst_custom", **{**TINY, **kw}).eval()


def reference_forward(sd: dict, video: torch.Tensor, cfg: dict) -> torch.Tensor:
    """TimeSformer joint_space_time written out from the state dict with plain einsums.

    Patchify each frame, add pos_embed to every frame and time_embed[t] to frame t, order
    tokens (n t), prepend CLS (+ pos_embed[0]), then full softmax attention over the
    whole sequence in every block.
    """
    B, C, T, H, W = video.shape
    p, D, heads = cfg["patch_size"], cfg["embed_dim"], cfg["num_heads"]
    hd = D // heads
    frames = video.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
    x = F.conv2d(frames, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)                                  # (B*T, S, D)
    S = x.shape[1]
    x = x + sd["pos_embed"][:, 1:]
    x = x.reshape(B, T, S, D)
    x = x + sd["time_embed"][0][None, :, None, :]
    x = torch.einsum("btsd->bstd", x).reshape(B, S * T, D)            # '(b n) t m -> b (n t) m'
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(B, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for i in range(cfg["depth"]):
        g = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (D,), g("norm1.weight"), g("norm1.bias"), eps=1e-6)
        qkv = torch.einsum("bld,ed->ble", h, g("attn.qkv.weight")) + g("attn.qkv.bias")
        q, k, v = qkv.reshape(B, -1, 3, heads, hd).unbind(2)          # (B, L, H, hd)
        a = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd)
        a = a.softmax(-1)
        o = torch.einsum("bhlm,bmhd->blhd", a, v).reshape(B, -1, D)
        x = x + torch.einsum("bld,ed->ble", o, g("attn.proj.weight")) + g("attn.proj.bias")
        h = F.layer_norm(x, (D,), g("norm2.weight"), g("norm2.bias"), eps=1e-6)
        h = F.gelu(torch.einsum("bld,ed->ble", h, g("mlp.fc1.weight")) + g("mlp.fc1.bias"))
        x = x + torch.einsum("bld,ed->ble", h, g("mlp.fc2.weight")) + g("mlp.fc2.bias")
    x = F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return x[:, 0] @ sd["head.weight"].T + sd["head.bias"]


def test_matches_plain_reference():
    model = tiny()
    video = torch.randn(2, 3, 3, 16, 16)
    with torch.no_grad():
        ours = model(video)
        ref = reference_forward(model.state_dict(), video, TINY)
    assert ours.shape == (2, 5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_grid_and_token_order():
    model = tiny()
    assert model.grid_size == 3 * 16 and model.frame_grid == (4, 4)
    # A clip that is zero except in patch n=5 (row 1, col 1) of frame t=2.
    video = torch.zeros(1, 3, 3, 16, 16)
    video[0, :, 2, 4:8, 4:8] = 1.0
    with torch.no_grad():
        tokens = model.embed(video)
        raw = model.raw_patch_tokens(tokens)                               # (1, T*S, D)
    bias = model.patch_embed.proj.bias
    changed = ((raw - bias).abs().sum(-1) > 1e-6).nonzero()[:, 1].tolist()
    assert changed == [5 * 3 + 2]                                          # n * T + t
    maps = frame_maps((raw - bias).abs().sum(-1), 3, (4, 4))
    assert maps.shape == (1, 3, 4, 4) and maps[0, 2, 1, 1] > 0 and maps.sum() == maps[0, 2, 1, 1]


def test_no_policy_mask_and_compact_agree_with_iared_patched():
    model = tiny()
    iared.patch(model, "iared", groups=1)
    video = torch.randn(3, 3, 3, 16, 16)
    with torch.no_grad():
        lm, im = model(video, return_info=True, execution="mask")
        lc, ic = model(video, return_info=True, execution="compact")
    torch.testing.assert_close(lm, lc, atol=1e-5, rtol=1e-4)
    assert len(im.stages) == 1 and im.stages[0].scores.shape == (3, 48)
    assert torch.equal(im.stages[0].keep, ic.stages[0].keep)


def test_timesformer_checkpoint_layout_loads(tmp_path):
    src = tiny()
    wrapped = {"model_state": {"model." + k: v for k, v in src.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ts.pyth")
    dst = tiny()
    torch.nn.init.zeros_(dst.head.weight)
    load_pretrained(dst, tmp_path / "ts.pyth")
    video = torch.randn(1, 3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(dst(video), src(video))
    assert "time_embed" in dst.state_dict() and dst.state_dict()["time_embed"].shape == (1, 3, 32)


def test_other_frame_count_and_resolution_resample(tmp_path):
    src = tiny()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    dst = tiny(num_frames=5, img_size=24)
    load_pretrained(dst, tmp_path / "w.pth")
    assert dst.time_embed.shape == (1, 5, 32) and dst.pos_embed.shape == (1, 1 + 36, 32)
    # Linear interpolation keeps the end points' average: a constant embedding stays constant.
    const = torch.ones(1, 3, 4)
    torch.testing.assert_close(resample_time_embed(const, 7), torch.ones(1, 7, 4))
    with torch.no_grad():
        assert dst(torch.randn(1, 3, 5, 24, 24)).shape == (1, 5)


def test_image_vit_checkpoint_gets_zero_time_embed(tmp_path):
    torch.manual_seed(1)
    vit = iared.create_model("vit_custom", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                             num_classes=5)
    torch.save({"model": vit.state_dict()}, tmp_path / "img.pth")
    model = load_pretrained(tiny(), tmp_path / "img.pth")
    assert torch.count_nonzero(model.time_embed) == 0
    # With one frame and a zero time embedding JointST is exactly the image ViT.
    single = load_pretrained(tiny(num_frames=1), tmp_path / "img.pth")
    frame = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(single(frame[:, :, None]), vit.eval()(frame), atol=1e-5, rtol=1e-4)


def test_save_load_model_round_trip(tmp_path):
    model = tiny()
    iared.patch(model, "iared", groups=1)
    iared.save_model(model, tmp_path / "m.safetensors", arch="jointst_custom")
    back = iared.load_model(tmp_path / "m.safetensors")
    assert isinstance(back, JointSTViT) and back.num_frames == 3
    video = torch.randn(2, 3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(video), model(video))


def test_registered_base_model_shapes():
    with torch.device("meta"):
        m = iared.create_model("timesformer_jointst_base_patch16_224")
    assert m.grid_size == 1568 and m.num_frames == 8
    assert m.time_embed.shape == (1, 8, 768) and m.pos_embed.shape == (1, 197, 768)


def test_wrong_frame_count_is_a_clear_error():
    with pytest.raises(ValueError, match="frames"):
        tiny()(torch.randn(1, 3, 4, 16, 16))
