"""Patch-grid heatmaps of a ViT: IA-RED²'s informative scores and the baselines of Table 1.

One entry point, `explain(model, images, method, **kw) -> (B, G)`, G = `model.grid_size`,
non-negative, higher = more relevant. Methods:

* ``"attention"``: raw attention, the CLS row of block `block`'s attention to the patch
  tokens averaged over heads (IA-RED² uses Block_1, blocks 0-indexed; Table 5 compares
  blocks 0/1/2).
* ``"rollout"``: attention rollout (Abnar & Zuidema 2020).
* ``"gradcam"``: GradCAM (Selvaraju et al. 2017) adapted to ViTs, through captum.
* ``"chefer"``: gradient-weighted attention relevance (Chefer et al. 2021, "Generic
  Attention-model Explainability ...", the self-attention rule).
* ``"iared"``: the informative scores of an IA-RED²-patched model's interpreters.

The baselines explain the *unreduced* backbone: they run their own forward through the
blocks (`forward_with_attention`) and never call an attached token policy, so they can
be computed on the very model that IA-RED² patched. The math of rollout and of Chefer's
rule is factored into pure functions of attention tensors (`attention_rollout`,
`chefer_relevance`) and tested on hand-made stacks.

Side effects: none. The model is put in eval mode for the call and restored after;
gradients are taken with `torch.autograd.grad` on the attention/feature tensors only, so
no parameter's `.grad` or `requires_grad` changes, and no hook is left on the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

METHODS = ("attention", "rollout", "gradcam", "chefer", "iared")


# -- the math, as pure functions of attention tensors -----------------------------------


def cls_attention(attn: Tensor, num_prefix: int = 1) -> Tensor:
    """Raw attention heatmap: how much CLS attends to each patch token, mean over heads.

    Args:
        attn: (B, H, L, L) softmax attention of one block; rows are queries.
        num_prefix: P, prefix tokens (CLS first) that are not patches.

    Returns:
        (B, L - P).
    """
    return attn[:, :, 0, num_prefix:].mean(dim=1)


def attention_rollout(attns: list[Tensor], num_prefix: int = 1) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): attention flow through the residual stream.

    Per block, heads are averaged and the identity added for the skip connection, rows
    renormalised to sum to 1 (i.e. 0.5 A + 0.5 I); the blocks' matrices are multiplied,
    later blocks on the left: R = Â_L ... Â_1. The CLS row of R says how much of each
    input token reaches the CLS token at the output.

    Args:
        attns: per block, (B, H, L, L) softmax attention, first block first.
        num_prefix: P, prefix tokens (CLS first).

    Returns:
        (B, L - P) CLS row of the rollout, patch columns only.
    """
    B, _, L, _ = attns[0].shape
    eye = torch.eye(L, dtype=attns[0].dtype, device=attns[0].device)
    rollout = eye.expand(B, L, L)
    for attn in attns:
        a = attn.mean(dim=1) + eye                 # (B, L, L)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    return rollout[:, 0, num_prefix:]


def chefer_relevance(attns: list[Tensor], grads: list[Tensor], num_prefix: int = 1) -> Tensor:
    """Chefer et al. 2021 relevance for self-attention (their Eq. 5-6, encoder-only case).

    R starts as the identity (each token is relevant to itself); each block, first to
    last, adds its gradient-weighted attention applied to the relevance so far:

        Ā = E_h[(∇A ⊙ A)^+],   R <- R + Ā R.

    Args:
        attns: per block, (B, H, L, L) softmax attention A.
        grads: per block, (B, H, L, L) gradient of the target score w.r.t. A.
        num_prefix: P, prefix tokens (CLS first).

    Returns:
        (B, L - P) CLS row of R, patch columns only (non-negative by construction).
    """
    B, _, L, _ = attns[0].shape
    rel = torch.eye(L, dtype=attns[0].dtype, device=attns[0].device).expand(B, L, L)
    for attn, grad in zip(attns, grads):
        cam = (grad * attn).clamp(min=0).mean(dim=1)  # (B, L, L)
        rel = rel + cam @ rel
    return rel[:, 0, num_prefix:]


# -- forwards that expose what the explainers need --------------------------------------


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the call (a heatmap must not depend on train-time sampling), restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _block_forward(blk: nn.Module, x: Tensor, explicit_attention: bool = False,
                   norm1_adapter: Optional[nn.Module] = None) -> tuple[Tensor, Optional[Tensor]]:
    """`Block.forward` on a plain (B, L, D) tensor with every token valid.

    Args:
        blk: a `iared.backbones.vit.Block` (only its submodules are used, so a block whose
            class a policy swapped, e.g. for ATS, is still run as the plain block).
        x: (B, L, D) tokens.
        explicit_attention: compute attention as an explicit matrix (returned, and part
            of the graph so gradients w.r.t. it exist) instead of the fused kernel.
        norm1_adapter: module applied to the output of `norm1` before attention: the
            layer that GradCAM's hooks attach to.

    Returns:
        the block's output (B, L, D) and its (B, H, L, L) attention, or None.
    """
    h = blk.norm1(x)
    if norm1_adapter is not None:
        h = norm1_adapter(h)
    attn = None
    if explicit_attention:
        attn = blk.attn.attention_probs(h)                     # (B, H, L, L)
        _, _, v = blk.attn.qkv_heads(h)                         # (B, H, L, hd)
        B, L, D = x.shape
        x = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, L, D))
    else:
        x = x + blk.attn(h)
    x = x + blk.mlp(blk.norm2(x))
    return x, attn


def forward_with_attention(model: nn.Module, images: Tensor, upto: Optional[int] = None,
                           track_grad: bool = False) -> tuple[Optional[Tensor], list[Tensor]]:
    """The unreduced backbone's forward, recording every block's attention matrix.

    Reproduces `model(images)` of the model without a policy (same logits up to float
    rounding: explicit softmax-matmul instead of the fused attention kernel).

    Args:
        model: an `iared.backbones.VisionTransformer` (its policy, if any, is not called).
        images: (B, C, H, W).
        upto: stop after computing block `upto`'s attention (logits then None): what the
            raw-attention baseline needs, without running the later blocks.
        track_grad: make the embedded tokens a leaf requiring grad, so that the recorded
            attention matrices carry a graph even when the parameters are frozen (and no
            gradient ever reaches a parameter's `.grad`).

    Returns:
        (logits (B, num_classes) or None, per-block attention (B, H, L, L)).
    """
    tokens = model.embed(images, execution="mask")
    x = tokens.x
    if track_grad:
        x = x.detach().requires_grad_(True)
    attns = []
    for i, blk in enumerate(model.blocks):
        if upto is not None and i == upto:
            attns.append(blk.attn.attention_probs(blk.norm1(x)))
            return None, attns
        x, attn = _block_forward(blk, x, explicit_attention=True)
        attns.append(attn)
    return model.forward_head(tokens.with_x(x)), attns


def _resolve_target(logits: Tensor, target: Union[None, int, Tensor]) -> Tensor:
    """(B,) class index per image: the prediction when `target` is None."""
    B = logits.shape[0]
    if target is None:
        return logits.argmax(dim=-1)
    cls = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if cls.numel() == 1:  # one class for every image
        cls = cls.expand(B)
    if cls.numel() != B:
        raise ValueError(f"target: one class per image ({B}) or one for all, got {cls.numel()}")
    C = logits.shape[-1]
    if B and not bool(((cls >= 0) & (cls < C)).all()):
        raise ValueError(f"target classes must be in 0..{C - 1}, got {cls.tolist()}")
    return cls


# -- the methods ------------------------------------------------------------------------


@torch.no_grad()
def raw_attention(model: nn.Module, images: Tensor, block: int = 1) -> Tensor:
    """CLS attention to patches at block `block` (0-indexed), averaged over heads: (B, G)."""
    depth = len(model.blocks)
    if not -depth <= block < depth:
        raise ValueError(f"block {block} out of range for a {depth}-block model")
    _, attns = forward_with_attention(model, images, upto=block % depth)
    return cls_attention(attns[-1], model.num_prefix_tokens)


@torch.no_grad()
def rollout(model: nn.Module, images: Tensor) -> Tensor:
    """Attention rollout through all blocks: (B, G)."""
    _, attns = forward_with_attention(model, images)
    return attention_rollout(attns, model.num_prefix_tokens)


def chefer(model: nn.Module, images: Tensor, target: Union[None, int, Tensor] = None) -> Tensor:
    """Chefer et al. 2021 gradient-weighted attention relevance for class `target`: (B, G)."""
    with torch.enable_grad():
        logits, attns = forward_with_attention(model, images, track_grad=True)
        cls = _resolve_target(logits, target)
        # Images are independent in a ViT (LayerNorm is per token), so the gradient of the
        # batch sum is each image's own gradient.
        score = logits.gather(1, cls[:, None]).sum()
        grads = torch.autograd.grad(score, attns)
    return chefer_relevance([a.detach() for a in attns], list(grads), model.num_prefix_tokens)


def gradcam(model: nn.Module, images: Tensor, target: Union[None, int, Tensor] = None,
            block: int = -1) -> Tensor:
    """GradCAM for ViTs: the patch tokens entering block `block`'s attention as feature map.

    Why not the tokens output by the last block: the logits read only the CLS token of the
    last block's output, so the gradient w.r.t. the output *patch* tokens is exactly
    zero and GradCAM would be blank. The usual ViT adaptation (pytorch-grad-cam's
    `target_layers=[model.blocks[-1].norm1]`) takes the last block's `norm1` output, the
    last place where patch tokens still feed the CLS token; we do the same. Those patch
    tokens, reshaped to the (h, w) grid with channels first, are the "feature map";
    channel weights are the spatial mean of the target logit's gradient, and the map is
    ReLU(sum_c w_c A_c) (captum's `LayerGradCam` with `relu_attributions=True`).

    captum hooks a module's output, and our blocks take and return `Tokens`, so the hook
    sits on a throw-away `nn.Identity` applied to `norm1`'s output inside our own forward
    (`_block_forward`): nothing is registered on the model itself.

    Args:
        model: a `VisionTransformer`.
        images: (B, C, H, W).
        target: class per image (int or (B,)); None: the predicted class.
        block: the block whose `norm1` output is the feature map (default: the last).

    Returns:
        (B, G) non-negative.
    """
    from captum.attr import LayerGradCam  # optional dependency, only needed here

    P = model.num_prefix_tokens
    gh, gw = model.patch_embed.grid_size
    depth = len(model.blocks)
    block = block % depth
    adapter = _PatchFeatureMap(P, (gh, gw))

    def forward_func(imgs: Tensor) -> Tensor:
        tokens = model.embed(imgs, execution="mask")
        # A leaf requiring grad, so the feature map has a graph even with frozen weights.
        x = tokens.x.detach().requires_grad_(True)
        for i, blk in enumerate(model.blocks):
            x, _ = _block_forward(blk, x, norm1_adapter=adapter if i == block else None)
        return model.forward_head(tokens.with_x(x))

    with torch.no_grad():
        cls = _resolve_target(forward_func(images), target)
    cam = LayerGradCam(forward_func, adapter.feature_map).attribute(images, target=cls, relu_attributions=True)
    return cam.detach().reshape(images.shape[0], gh * gw)  # (B, 1, h, w) -> (B, G)


class _PatchFeatureMap(nn.Module):
    """Identity on (B, P + N, D) tokens that routes the patch tokens through a CNN-shaped
    (B, D, h, w) `feature_map` module on the way: the layer captum's GradCAM hooks."""

    def __init__(self, num_prefix: int, grid_hw: tuple[int, int]):
        super().__init__()
        self.num_prefix = num_prefix
        self.grid_hw = grid_hw
        self.feature_map = nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        B, L, D = h.shape
        P, (gh, gw) = self.num_prefix, self.grid_hw
        fmap = self.feature_map(h[:, P:].transpose(1, 2).reshape(B, D, gh, gw))  # (B, D, h, w)
        return torch.cat([h[:, :P], fmap.reshape(B, D, gh * gw).transpose(1, 2)], dim=1)


@torch.no_grad()
def iared_scores(model: nn.Module, images: Tensor, group: Optional[int] = 1,
                 mode: object = None) -> Union[Tensor, list[Tensor]]:
    """The informative scores of an IA-RED²-patched model, on the full patch grid.

    Tokens dropped by an earlier group score 0 on later groups' heatmaps (the paper's
    "Emergence of Interpretability"), which `StageRecord.scores` already encodes.

    Args:
        model: a model with an attached policy whose `StageRecord`s carry `scores`.
        images: (B, C, H, W).
        group: which group's scores (0-indexed; the paper shows the second group, 1);
            None for all groups.
        mode: passed to the policy (None: its default, greedy for IA-RED²).

    Returns:
        (B, G) scores in [0, 1], or a list of them, one per group, with `group=None`.
    """
    if getattr(model, "policy", None) is None:
        raise ValueError("method 'iared' needs a model with an IA-RED² policy attached (iared.patch)")
    _, info = model(images, return_info=True, mode=mode)
    scores = [s.scores for s in info.stages]
    if not scores or any(s is None for s in scores):
        raise ValueError("the attached policy records no informative scores")
    if group is None:
        return [s.float() for s in scores]
    if not -len(scores) <= group < len(scores):
        raise ValueError(f"group {group} out of range: the policy has {len(scores)} groups")
    return scores[group].float()


def explain(model: nn.Module, images: Tensor, method: str, **kw) -> Union[Tensor, list[Tensor]]:
    """Patch-grid heatmaps (B, G) of `images` by `method` (see the module docstring).

    Args:
        model: an `iared.backbones.VisionTransformer` (with a policy for "iared").
        images: (B, C, H, W), already normalised as the model expects.
        method: one of `METHODS`.
        **kw: the method's options: `block` (attention, default 1; gradcam, default -1),
            `target` (gradcam, chefer: class per image, default the prediction),
            `group` and `mode` (iared: default group 1; None for a list of all groups).

    Returns:
        (B, G) non-negative float heatmaps, higher = more relevant (a list for
        `method="iared", group=None`).
    """
    fns = {"attention": raw_attention, "rollout": rollout, "gradcam": gradcam,
           "chefer": chefer, "iared": iared_scores}
    if method not in fns:
        raise ValueError(f"unknown heatmap method {method!r}; expected one of {', '.join(METHODS)}")
    with _eval_mode(model):
        return fns[method](model, images, **kw)


def explain_spec(model: nn.Module, images: Tensor, spec: str) -> Tensor:
    """`explain` with the method and at most one integer option written as one string,
    e.g. "rollout", "attention@block=6" or "iared@group=0" (0-based)."""
    method, _, option = spec.partition("@")
    key, _, value = option.partition("=")
    return explain(model, images, method, **({key: int(value)} if option else {}))
