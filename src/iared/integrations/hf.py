"""Hugging Face transformers' `ViTModel` / `ViTForImageClassification` as an iared backbone.

    hf = transformers.ViTForImageClassification.from_pretrained(...)
    ours = iared.patch(hf, policy="ats")             # = iared.integrations.hf.from_hf + patch
    logits, info = ours(images, return_info=True)
    hf = iared.unpatch(ours)                          # the same HF object, our weights written back

Design: unlike timm's (see `iared.integrations.timm`), Hugging Face's ViT keeps the
query, key and value projections as three linears, where our `Attention` (timm's
layout) has one `qkv`. A parameter cannot be shared across that split, so the weights
are COPIED: `from_hf` concatenates q, k, v into `qkv` and maps every other tensor by
name (`KEY_MAP` documents both directions); `to_hf` / `iared.unpatch` writes the
current weights back, q, k, v split again. Until then, training the iared model does
not change the HF one.

Mapped from the HF config: `image_size`, `patch_size`, `num_channels`, `hidden_size`,
`num_hidden_layers`, `num_attention_heads`, `intermediate_size`, `qkv_bias`,
`layer_norm_eps`, and the classifier's `num_labels`. Refused, naming the feature: a
`hidden_act` other than exact "gelu", dropout (it changes nothing in eval mode, but a
converted model trained with it would silently train without), a `head_dim` other than
hidden_size / heads, and non-square patches.

`ViTModel` becomes our model without classifier, whose output is the final-normed
class token, i.e. HF's `last_hidden_state[:, 0]`. HF's pooler (a Linear + tanh on that
token) is not part of our model: it is left out, and left unchanged by `to_hf`, as is
the mask token of masked image modelling.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..backbones.vit import ViTConfig, VisionTransformer
from . import library_of, remember_source, source_of

# Our name -> HF name(s), inside `ViTModel` (prefixed "vit." under the classifier).
# "{i}" is the block index; names ending in a module are expanded with .weight/.bias.
# transformers 5 renamed the layer modules; both layouts are recognised.
KEY_MAP: dict[str, dict[str, Union[str, tuple[str, str, str]]]] = {
    "transformers>=5": {
        "blocks.{i}.norm1": "layers.{i}.layernorm_before",
        "blocks.{i}.attn.qkv": ("layers.{i}.attention.q_proj", "layers.{i}.attention.k_proj",
                                "layers.{i}.attention.v_proj"),
        "blocks.{i}.attn.proj": "layers.{i}.attention.o_proj",
        "blocks.{i}.norm2": "layers.{i}.layernorm_after",
        "blocks.{i}.mlp.fc1": "layers.{i}.mlp.fc1",
        "blocks.{i}.mlp.fc2": "layers.{i}.mlp.fc2",
    },
    "transformers<5": {
        "blocks.{i}.norm1": "encoder.layer.{i}.layernorm_before",
        "blocks.{i}.attn.qkv": ("encoder.layer.{i}.attention.attention.query",
                                "encoder.layer.{i}.attention.attention.key",
                                "encoder.layer.{i}.attention.attention.value"),
        "blocks.{i}.attn.proj": "encoder.layer.{i}.attention.output.dense",
        "blocks.{i}.norm2": "encoder.layer.{i}.layernorm_after",
        "blocks.{i}.mlp.fc1": "encoder.layer.{i}.intermediate.dense",
        "blocks.{i}.mlp.fc2": "encoder.layer.{i}.output.dense",
    },
}
EMBED_MAP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
IGNORED = ("pooler.", "embeddings.mask_token")  # HF parameters our model has no use for
CLASSES = ("ViTModel", "ViTForImageClassification")


def _is_classifier(model: nn.Module) -> bool:
    return type(model).__name__ == "ViTForImageClassification"


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def hf_config(model: nn.Module) -> ViTConfig:
    """The `ViTConfig` of a Hugging Face ViT, or an error naming what our backbone lacks.

    Args:
        model: transformers' `ViTModel` or `ViTForImageClassification`.

    Returns:
        The config that builds our `VisionTransformer` with the same architecture
        (no classifier for `ViTModel`).

    Raises:
        TypeError: `model` is another class.
        ValueError: listing every setting our backbone does not compute identically.
    """
    if library_of(model) != "transformers" or type(model).__name__ not in CLASSES:
        raise TypeError(f"{type(model).__module__}.{type(model).__name__} is not transformers' ViTModel or "
                        "ViTForImageClassification; iared converts only those")
    c = model.config
    problems = []
    if c.hidden_act != "gelu":
        problems.append(f"hidden_act={c.hidden_act!r} (only exact 'gelu')")
    if c.hidden_dropout_prob or c.attention_probs_dropout_prob:
        problems.append("dropout (hidden_dropout_prob and attention_probs_dropout_prob must be 0)")
    dim, heads = c.hidden_size, c.num_attention_heads
    if dim % heads or getattr(c, "head_dim", None) not in (None, dim // heads):
        problems.append(f"a head_dim other than hidden_size / num_attention_heads ({dim} / {heads})")
    patch = _pair(c.patch_size)
    if patch[0] != patch[1]:
        problems.append(f"non-square patches {patch}")
    mlp_ratio = c.intermediate_size / dim
    if int(dim * mlp_ratio) != c.intermediate_size:
        problems.append(f"intermediate_size {c.intermediate_size} that hidden_size * mlp_ratio cannot express")
    head = model.classifier if _is_classifier(model) else nn.Identity()
    if not (isinstance(head, nn.Identity) or (type(head) is nn.Linear and head.bias is not None)):
        problems.append(f"classifier {type(head).__name__} (only a biased Linear or none)")
    if problems:
        raise ValueError(f"cannot convert {type(model).__name__}: iared's backbone does not compute "
                         + "; ".join(problems))
    h, w = _pair(c.image_size)
    return ViTConfig(
        img_size=h if h == w else (h, w),
        patch_size=patch[0],
        in_chans=c.num_channels,
        num_classes=head.out_features if isinstance(head, nn.Linear) else 0,
        embed_dim=dim,
        depth=c.num_hidden_layers,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=bool(c.qkv_bias),
        norm_eps=float(c.layer_norm_eps),
    )


def key_pairs(model: nn.Module, config: ViTConfig) -> list[tuple[str, tuple[str, ...]]]:
    """Each of our state-dict keys with the HF parameter name(s) it is made of.

    Args:
        model: the HF model (its parameter names pick the layout).
        config: our config (depth, qkv bias, classifier).

    Returns:
        (our key, HF keys) pairs; three HF keys (q, k, v) are concatenated along dim 0.
    """
    prefix = "vit." if _is_classifier(model) else ""
    names = {n for n, _ in model.named_parameters()}
    layout = next((m for m in KEY_MAP.values()
                   if config.depth == 0 or f"{prefix}{m['blocks.{i}.norm1'].format(i=0)}.weight" in names), None)
    if layout is None:
        raise ValueError(f"unrecognised {type(model).__name__} layout (neither of {', '.join(KEY_MAP)})")
    pairs = [(ours, (prefix + hf,)) for ours, hf in EMBED_MAP.items()]
    for i in range(config.depth):
        for ours, hf in layout.items():
            hf = tuple(prefix + h.format(i=i) for h in ((hf,) if isinstance(hf, str) else hf))
            suffixes = ("weight", "bias") if ours != "blocks.{i}.attn.qkv" or config.qkv_bias else ("weight",)
            pairs += [(f"{ours.format(i=i)}.{s}", tuple(f"{h}.{s}" for h in hf)) for s in suffixes]
    if config.num_classes > 0:
        pairs += [("head.weight", ("classifier.weight",)), ("head.bias", ("classifier.bias",))]
    return pairs


def _checked_pairs(model: nn.Module, config: ViTConfig) -> tuple[list[tuple[str, tuple[str, ...]]], dict]:
    pairs = key_pairs(model, config)
    params = dict(model.named_parameters())
    used = {k for _, hf in pairs for k in hf}
    prefix = "vit." if _is_classifier(model) else ""
    missing = sorted(used - set(params))
    unknown = sorted(k for k in params if k not in used and not k.removeprefix(prefix).startswith(IGNORED))
    if missing or unknown:
        raise ValueError(f"{type(model).__name__} parameters do not match its config: missing {missing[:5]}, "
                         f"unrecognised {unknown[:5]}")
    return pairs, params


def from_hf(model: nn.Module) -> VisionTransformer:
    """Convert a Hugging Face ViT into iared's `VisionTransformer`, copying its weights.

    Args:
        model: transformers' `ViTModel` or `ViTForImageClassification`.

    Returns:
        A new `VisionTransformer` with copies of `model`'s weights (q, k, v concatenated
        into `qkv`), on its device and in its dtype and train/eval mode, remembering
        `model` for `to_hf`. For `ViTModel` it has no classifier and returns the
        final-normed class token (HF's `last_hidden_state[:, 0]`; the pooler is left out).
    """
    config = hf_config(model)
    pairs, params = _checked_pairs(model, config)
    with torch.no_grad():
        sd = {ours: torch.cat([params[k] for k in hf]) if len(hf) > 1 else params[hf[0]].clone()
              for ours, hf in pairs}
    with torch.device("meta"):  # `assign=True` below puts the copies in place
        ours = VisionTransformer(config)
    ours.load_state_dict(sd, strict=True, assign=True)
    ours.train(model.training)
    remember_source(ours, model)
    return ours


def _new_hf(config: ViTConfig) -> nn.Module:
    import transformers

    c = config
    problems = []
    if c.distilled:
        problems.append("a distillation token")
    if c.head_hidden > 0:
        problems.append("a two-layer head (head_hidden)")
    if c.patch_overlap:
        problems.append(f"overlapping patches (patch_overlap={c.patch_overlap})")
    if not c.final_norm:
        problems.append("no final norm (final_norm=False)")
    if c.attn_scale is not None and abs(c.attn_scale - (c.embed_dim // c.num_heads) ** -0.5) > 1e-12:
        problems.append(f"attention scale {c.attn_scale} (HF: head_dim**-0.5)")
    if problems:
        raise ValueError("Hugging Face's ViT cannot express " + "; ".join(problems))
    img = c.img_size if isinstance(c.img_size, int) else list(c.img_size)
    hf_cfg = transformers.ViTConfig(
        image_size=img, patch_size=c.patch_size, num_channels=c.in_chans, hidden_size=c.embed_dim,
        num_hidden_layers=c.depth, num_attention_heads=c.num_heads, intermediate_size=int(c.embed_dim * c.mlp_ratio),
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=c.norm_eps,
        qkv_bias=c.qkv_bias, num_labels=max(c.num_classes, 1))
    if c.num_classes > 0:
        return transformers.ViTForImageClassification(hf_cfg)
    return transformers.ViTModel(hf_cfg, add_pooling_layer=False)


def to_hf(model: VisionTransformer, hf_model: Optional[nn.Module] = None) -> nn.Module:
    """Write an iared `VisionTransformer`'s weights into a Hugging Face ViT and return it.

    Args:
        model: an iared `VisionTransformer` (its policy, if any, is not part of HF's model).
        hf_model: the HF model to write into. Default: the one `model` was converted from
            by `from_hf`, else a new `ViTForImageClassification` (or `ViTModel` without
            pooler, for a model without classifier) built from `model.config`.

    Returns:
        The HF model, holding `model`'s current weights (`qkv` split into q, k, v), in
        `model`'s train/eval mode; its pooler and mask token, if any, are left unchanged.

    Raises:
        TypeError: `model` is not an iared `VisionTransformer`.
        ValueError: the HF model's architecture differs from `model.config`, or
            `model` has what HF's ViT cannot express.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"to_hf needs an iared VisionTransformer, got {type(model).__name__}")
    target = hf_model
    if target is None:
        source = source_of(model)
        target = source if source is not None and library_of(source) == "transformers" else None
    if target is None:
        target = _new_hf(model.config)
    elif hf_config(target) != model.config:
        raise ValueError(f"{type(target).__name__}'s architecture {hf_config(target)} differs from the model's "
                         f"{model.config}")
    pairs, params = _checked_pairs(target, model.config)
    ours = model.state_dict()
    with torch.no_grad():
        for key, hf in pairs:
            for name, part in zip(hf, ours[key].chunk(len(hf), dim=0)):
                params[name].copy_(part)
    return target.train(model.training)


__all__ = ["KEY_MAP", "from_hf", "hf_config", "key_pairs", "to_hf"]
