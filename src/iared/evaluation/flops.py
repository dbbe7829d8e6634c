"""FLOPs per image, counted and analytic.

Convention: like the papers (DeiT-S = 4.6 GFLOPs, the IA-RED² paper's 12·N·D² + 2·N²·D
per block) and fvcore, one "FLOP" here is one multiply-add. `torch.utils.flop_counter`
counts a multiply-add as 2, so counted totals are halved.

`count_flops` runs each image alone (batch of one): with one image the compact execution
path removes dropped tokens with no padding, so the count is exactly the work that image
needs, including the policy's own cost (interpreters, the attention baseline's extra
blocks, ATS's sampling matmuls).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for the CPU SDPA kernel; without this it counts 0.

    Q·Kᵀ and A·V: 2 matmuls of B·H·Lq·Lk·d multiply-adds, 2 FLOPs each (counter units).
    """
    b, h, lq, d = query_shape
    lk = key_shape[-2]
    dv = value_shape[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def block_macs(n: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """Multiply-adds of one MSA-FFN block on n tokens: (4 + 2·r)·n·D² + 2·n²·D.

    With r = 4 this is the paper's 12·N·D² + 2·N²·D (qkv 3ND², proj ND², FFN 8ND²,
    QKᵀ and AV N²D each).
    """
    hidden = int(dim * mlp_ratio)
    return 4 * n * dim * dim + 2 * n * dim * hidden + 2 * n * n * dim


def interpreter_macs(n: int, dim: int, heads: int, head_dim: int) -> int:
    """Multiply-adds of one multi-head interpreter on n patch tokens (Eq. 1).

    F_k on the policy token (D·H·d_h), folding its keys into F_q (H·d_h·D: see
    `MultiHeadInterpreter.forward`), then one (D -> H) product per token (n·D·H). Under
    `torch.inference_mode` the fold is cached, so only the n·D·H term is paid per image.
    LayerNorm and sigmoid are elementwise and not counted, as the block count does not
    count them either.
    """
    return 2 * dim * heads * head_dim + n * dim * heads


def vit_macs(block_tokens: Tensor, dim: int, mlp_ratio: float = 4.0) -> Tensor:
    """Analytic multiply-adds of the blocks for per-image token counts.

    Args:
        block_tokens: (B, depth) tokens (prefix included) entering each block, as in
            `ReductionInfo.block_tokens`.
        dim: token width D.
        mlp_ratio: FFN hidden width / D.

    Returns:
        (B,) float64 multiply-adds per image, blocks only.
    """
    n = block_tokens.double()
    hidden = float(int(dim * mlp_ratio))
    return ((4 * dim * dim + 2 * dim * hidden) * n + 2 * dim * n * n).sum(dim=1)


@torch.no_grad()
def count_flops(model: nn.Module, images: Tensor, **forward_kwargs: Any) -> Tensor:
    """Multiply-adds of a forward, per image, counted by `FlopCounterMode`.

    Args:
        model: any module; in eval mode its policy drops tokens for real.
        images: (B, ...) inputs; each is run as a batch of one.
        **forward_kwargs: passed to `model(...)`.

    Returns:
        (B,) float64 multiply-adds per image.
    """
    out = []
    for i in range(images.shape[0]):
        with FlopCounterMode(display=False) as counter:
            model(images[i:i + 1], **forward_kwargs)
        out.append(counter.get_total_flops() / 2)
    return torch.tensor(out, dtype=torch.float64)
