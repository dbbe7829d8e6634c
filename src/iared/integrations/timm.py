"""timm's ViT / DeiT (`VisionTransformer`, `VisionTransformerDistilled`) as an iared backbone.

    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    ours = iared.patch(model, policy="ats")         # = iared.integrations.timm.from_timm + patch
    logits, info = ours(images, return_info=True)
    model = iared.unpatch(ours)                      # timm's model back, same parameters

Design: the weights are SHARED, not copied and not wrapped. `from_timm` reads a
`ViTConfig` off the timm model, builds our `VisionTransformer` on the meta device (no
memory, no init), and assigns timm's own `nn.Parameter` objects into our modules; the
two state dicts use the same names (our backbone mirrors timm's layout), so this is one
loop over names. Why:

- our `Block` / `Attention` classes run unchanged, so every policy, `return_info`, the
  packed execution of compact tokens and the oneDNN fast path `cpu_kernels` (which
  recognises our module types) work exactly as on a registry model. Wrapping timm's
  blocks instead would need a second implementation of each of them.
- nothing is duplicated (ViT-B: 330 MB), and the two models cannot drift apart: loading
  weights into, or training, either one changes both, and `to_timm` / `iared.unpatch`
  give back the very object the user passed in.

What our backbone would not compute identically is refused up front, naming the
feature, rather than approximated: register tokens, `no_embed_class`, pooling other than
the class token, `fc_norm`, `pre_norm`, qk-norm and the other extra norms, LayerScale,
any activation but exact GELU, `dynamic_img_size` / dynamic padding, and other block,
attention, MLP or patch-embedding classes. Dropout, drop path and patch dropout are
refused too: they change nothing in eval mode, but a converted model trained with them
would silently train without them.

timm's `pretrained_cfg` (mean, std, interpolation, crop_pct, input_size, crop_mode, ...)
travels with the converted model as the plain dict `model.pretrained_cfg`.
"""

from __future__ import annotations

import functools
from typing import Iterable, Union

import torch
from torch import nn

from timm.layers import Attention as TimmAttention
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import Mlp as TimmMlp
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.layers.activations import GELU as TimmGELU
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from ..backbones.vit import ViTConfig, VisionTransformer
from . import library_of, remember_source, source_of

TIMM_NORM_EPS = 1e-6  # timm's ViT LayerNorm default


def _is_layer_norm(m: nn.Module) -> bool:
    return (type(m) in (nn.LayerNorm, TimmLayerNorm) and len(m.normalized_shape) == 1
            and m.weight is not None and m.bias is not None)


def _is_exact_gelu(m: nn.Module) -> bool:
    return (type(m) is nn.GELU and m.approximate == "none") or type(m) is TimmGELU


def _absent(m) -> bool:
    # Optional submodules are Identity, None, or (in older timm) missing altogether.
    return m is None or isinstance(m, nn.Identity)


def _dropout_p(m: nn.Module) -> float:
    return float(getattr(m, "p", 0.0)) if not isinstance(m, nn.Identity) else 0.0


def _size(size: Iterable[int]) -> Union[int, tuple[int, int]]:
    h, w = (int(s) for s in size)
    return h if h == w else (h, w)


def timm_config(model: nn.Module) -> ViTConfig:
    """The `ViTConfig` of a timm ViT / DeiT, or an error naming what our backbone lacks.

    Args:
        model: timm's `VisionTransformer` or `VisionTransformerDistilled`.

    Returns:
        The config that builds our `VisionTransformer` with the same architecture.

    Raises:
        TypeError: `model` is another class (timm's other ViT families included).
        ValueError: listing every feature of `model` that iared's backbone does not
            compute identically.
    """
    if type(model) not in (TimmVisionTransformer, VisionTransformerDistilled):
        raise TypeError(f"{type(model).__module__}.{type(model).__name__} is not timm's VisionTransformer or "
                        "VisionTransformerDistilled (vit_* / deit_*); iared converts only those")
    distilled = type(model) is VisionTransformerDistilled
    problems: list[str] = []

    def need(ok: bool, feature: str) -> None:
        if not ok and feature not in problems:
            problems.append(feature)

    dim = model.embed_dim
    need(model.cls_token is not None, "no class token (class_token=False)")
    reg = getattr(model, "num_reg_tokens", 0)
    need(_absent(getattr(model, "reg_token", None)) and not reg, f"register tokens (reg_tokens={reg})")
    need(not model.no_embed_class, "no_embed_class=True (class token without a position embedding)")
    need(model.pos_embed is not None, "no position embedding (pos_embed='none')")
    need(model.global_pool == "token" and _absent(getattr(model, "attn_pool", None)),
         f"global_pool={model.global_pool!r} (iared classifies the class token: 'token' only)")
    need(_absent(getattr(model, "fc_norm", None)), "fc_norm (a norm after pooling)")
    need(_absent(getattr(model, "norm_pre", None)), "pre_norm=True (a norm in front of the blocks)")
    need(not getattr(model, "dynamic_img_size", False), "dynamic_img_size=True (iared models have a fixed input size)")
    need(not (distilled and getattr(model, "distilled_training", False)),
         "distilled_training=True (timm then returns both heads' logits in training; iared averages them)")
    need(not (distilled and isinstance(model.head, nn.Identity)),
         "a distilled model without classifier (timm averages the two tokens, iared returns the class token)")

    pe = model.patch_embed
    conv = getattr(pe, "proj", None)
    need(type(pe) is TimmPatchEmbed and pe.img_size is not None and getattr(pe, "strict_img_size", True)
         and pe.flatten and not getattr(pe, "dynamic_img_pad", False),
         "a patch embedding other than timm's PatchEmbed at a fixed image size")
    need(_absent(getattr(pe, "norm", None)), "a norm in the patch embedding (embed_norm_layer)")
    plain_conv = (type(conv) is nn.Conv2d and conv.bias is not None and tuple(conv.stride) == tuple(conv.kernel_size)
                  and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1)
    need(plain_conv, "a patch projection other than a biased convolution with stride = kernel")
    if plain_conv:
        need(conv.kernel_size[0] == conv.kernel_size[1], f"non-square patches {tuple(conv.kernel_size)}")

    need(_dropout_p(model.pos_drop) == 0 and _absent(getattr(model, "patch_drop", None))
         and _dropout_p(getattr(model, "head_drop", nn.Identity())) == 0,
         "dropout / patch dropout (pos_drop_rate, patch_drop_rate, drop_rate must be 0)")

    norms: list[nn.Module] = []
    final_norm = not isinstance(model.norm, nn.Identity)
    if final_norm:
        norms.append(model.norm)
    heads, hidden, qkv_bias, scales = set(), set(), set(), set()
    for blk in model.blocks:
        if type(blk) is not TimmBlock:
            need(False, f"block class {type(blk).__name__} (only timm's Block)")
            continue
        attn, mlp = blk.attn, blk.mlp
        norms += [blk.norm1, blk.norm2]
        need(isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity), "LayerScale (init_values)")
        need(isinstance(blk.drop_path1, nn.Identity) and isinstance(blk.drop_path2, nn.Identity),
             "drop path (drop_path_rate must be 0)")
        if type(attn) is not TimmAttention:
            need(False, f"attention class {type(attn).__name__} (only timm's Attention)")
        else:
            need(_absent(attn.q_norm) and _absent(attn.k_norm), "qk_norm")
            need(_absent(getattr(attn, "norm", None)), "scale_attn_norm (a norm on the attention output)")
            need(getattr(attn, "gate", None) is None, "gated attention")
            need(attn.qkv.in_features == dim and attn.qkv.out_features == 3 * dim
                 and attn.proj.in_features == dim and attn.proj.out_features == dim,
                 "attention width other than embed_dim (attn_head_dim / dim_out)")
            need(attn.proj.bias is not None, "proj_bias=False")
            need(_dropout_p(attn.attn_drop) == 0 and _dropout_p(attn.proj_drop) == 0,
                 "dropout (attn_drop_rate, proj_drop_rate must be 0)")
            heads.add(attn.num_heads)
            qkv_bias.add(attn.qkv.bias is not None)
            # timm's fused path calls SDPA with its default scale; only the manual path reads `scale`.
            scales.add(None if attn.fused_attn else float(attn.scale))
        if type(mlp) is not TimmMlp or type(mlp.fc1) is not nn.Linear or type(mlp.fc2) is not nn.Linear:
            need(False, f"MLP class {type(mlp).__name__} (only timm's Linear-GELU-Linear Mlp)")
        else:
            need(_is_exact_gelu(mlp.act), f"activation {type(mlp.act).__name__} (only exact, erf GELU)")
            need(_absent(getattr(mlp, "norm", None)), "scale_mlp_norm (a norm inside the MLP)")
            need(mlp.fc1.bias is not None and mlp.fc2.bias is not None, "MLP without biases (proj_bias=False)")
            need(_dropout_p(mlp.drop1) == 0 and _dropout_p(mlp.drop2) == 0, "dropout (proj_drop_rate must be 0)")
            hidden.add(mlp.fc1.out_features)
    for n in norms:
        need(_is_layer_norm(n), f"norm layer {type(n).__name__} (only LayerNorm with weight and bias)")
    eps = {float(n.eps) for n in norms if _is_layer_norm(n)}
    need(len(eps) <= 1, f"LayerNorms with different eps {sorted(eps)}")
    need(len(heads) <= 1 and len(hidden) <= 1 and len(qkv_bias) <= 1 and len(scales) <= 1,
         "blocks of different shapes")
    heads_n = next(iter(heads), 1)
    head_dim = dim // heads_n
    scale = next(iter(scales), None)
    if scale is not None and abs(scale - head_dim ** -0.5) <= 1e-12 * head_dim ** -0.5:
        scale = None
    hidden_n = next(iter(hidden), 4 * dim)
    mlp_ratio = hidden_n / dim
    need(int(dim * mlp_ratio) == hidden_n, f"an MLP width {hidden_n} that embed_dim * mlp_ratio cannot express")
    for head in (model.head, getattr(model, "head_dist", None)) if distilled else (model.head,):
        need(isinstance(head, nn.Identity) or (type(head) is nn.Linear and head.bias is not None),
             f"classifier {type(head).__name__} (only a biased Linear or none)")
    if problems:
        raise ValueError(f"cannot convert timm {type(model).__name__}: iared's backbone does not compute "
                         + "; ".join(problems))
    return ViTConfig(
        img_size=_size(pe.img_size),
        patch_size=int(conv.kernel_size[0]),
        in_chans=int(conv.in_channels),
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        embed_dim=dim,
        depth=len(model.blocks),
        num_heads=heads_n,
        mlp_ratio=mlp_ratio,
        qkv_bias=next(iter(qkv_bias), True),
        distilled=distilled,
        final_norm=final_norm,
        attn_scale=scale,
        norm_eps=next(iter(eps), TIMM_NORM_EPS),
    )


def _share(dst: nn.Module, src: nn.Module, ignore: tuple[str, ...] = ("policy.",)) -> None:
    """Make every parameter of `dst` the very parameter of `src` of the same name.

    Args:
        dst: the model whose modules receive the parameters.
        src: the model that owns them; names starting with `ignore` (an attached policy's
            own parameters) are not expected in `dst`.

    Raises:
        ValueError: the two models' parameter names, shapes or buffers differ.
    """
    src_params = {n: p for n, p in src.named_parameters(remove_duplicate=False) if not n.startswith(ignore)}
    dst_params = dict(dst.named_parameters(remove_duplicate=False))
    missing = sorted(set(dst_params) - set(src_params))
    unexpected = sorted(set(src_params) - set(dst_params))
    wrong = [f"{n} {tuple(src_params[n].shape)} vs {tuple(p.shape)}"
             for n, p in dst_params.items() if n in src_params and src_params[n].shape != p.shape]
    buffers = sorted({n for n, _ in src.named_buffers()} ^ {n for n, _ in dst.named_buffers()})
    if missing or unexpected or wrong or buffers:
        raise ValueError(f"{type(src).__name__} and {type(dst).__name__} differ: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}, buffers {buffers[:5]}")
    for name, p in src_params.items():
        if dst_params[name] is not p:
            owner, _, leaf = name.rpartition(".")
            setattr(dst.get_submodule(owner), leaf, p)


def from_timm(model: nn.Module) -> VisionTransformer:
    """Convert timm's ViT / DeiT into iared's `VisionTransformer`, sharing its parameters.

    Args:
        model: timm's `VisionTransformer` or `VisionTransformerDistilled` (any size and
            resolution; see the module docstring for the features refused).

    Returns:
        A new `VisionTransformer` whose parameters are `model`'s own objects (change one
        model, the other sees it), in `model`'s train/eval mode, with `pretrained_cfg`
        (a dict, empty if timm had none) and `model` remembered for `to_timm`.
    """
    config = timm_config(model)
    with torch.device("meta"):  # every parameter is replaced by timm's just below
        ours = VisionTransformer(config)
    _share(ours, model)
    ours.train(model.training)
    ours.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    remember_source(ours, model)
    return ours


def _timm_kwargs(c: ViTConfig) -> dict:
    problems = []
    if c.head_hidden > 0:
        problems.append("a two-layer head (head_hidden)")
    if c.patch_overlap:
        problems.append(f"overlapping patches (patch_overlap={c.patch_overlap})")
    if c.attn_scale is not None and abs(c.attn_scale - (c.embed_dim // c.num_heads) ** -0.5) > 1e-12:
        problems.append(f"attention scale {c.attn_scale} (timm: head_dim**-0.5)")
    if c.distilled and c.num_classes <= 0:
        problems.append("a distilled model without classifier (timm averages the two tokens)")
    if problems:
        raise ValueError("timm's VisionTransformer cannot express " + "; ".join(problems))
    img = c.img_size if isinstance(c.img_size, int) else tuple(c.img_size)
    kw = dict(img_size=img, patch_size=c.patch_size, in_chans=c.in_chans, num_classes=c.num_classes,
              embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
              qkv_bias=c.qkv_bias, final_norm=c.final_norm, weight_init="skip")
    if c.norm_eps != TIMM_NORM_EPS:
        kw["norm_layer"] = functools.partial(TimmLayerNorm, eps=c.norm_eps)
    return kw


def to_timm(model: VisionTransformer) -> nn.Module:
    """timm's model for an iared `VisionTransformer`, sharing its parameters.

    For a model made by `from_timm` this is the original timm object (any parameter
    replaced on the iared side since, e.g. by loading with `assign=True`, is shared into
    it again); for any other of our ViTs, a new timm `VisionTransformer` (or
    `VisionTransformerDistilled`) built around our parameters. An attached policy is
    not part of it and stays on `model`.

    Args:
        model: an iared `VisionTransformer`.

    Returns:
        The timm model, in `model`'s train/eval mode.

    Raises:
        TypeError: `model` is not an iared `VisionTransformer`.
        ValueError: `model` has what timm's ViT cannot express (a two-layer head, a
            non-default attention scale), or a parameter whose shape no longer fits the
            original timm model.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"to_timm needs an iared VisionTransformer, got {type(model).__name__}")
    source = source_of(model)
    if source is not None and library_of(source) == "timm":
        _share(source, model)
        return source.train(model.training)
    c = model.config
    cls = VisionTransformerDistilled if c.distilled else TimmVisionTransformer
    timm_model = cls(**_timm_kwargs(c), device="meta")  # every parameter is replaced by ours just below
    _share(timm_model, model)
    if getattr(model, "pretrained_cfg", None):
        timm_model.pretrained_cfg = dict(model.pretrained_cfg)
    return timm_model.train(model.training)


__all__ = ["from_timm", "timm_config", "to_timm"]
