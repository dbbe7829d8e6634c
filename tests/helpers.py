"""Small models shared by the policy tests (imported as `helpers`: pytest puts tests/ on the path)."""

import torch

import iared


def tiny(depth=6, **kw):
    """A 32 px, 8x8-patch-grid ViT (64 patches + CLS) with fixed random weights, in eval mode."""
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=4, embed_dim=32, depth=depth, num_heads=2, num_classes=10)
    return iared.create_model("vit_custom", **{**cfg, **kw}).eval()


def peaked(model, sharpness=8.0):
    """Make attention non-uniform (random init attends almost uniformly, so ATS keeps K' = K)."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(sharpness)
    return model
