"""The temporal-difference baseline of the IA-RED² paper (Table 3), as a token policy.

"[It] calculates the L2 distance between the patch tokens at T and (T - 1) time step.
For those tokens that have a longer distance to the previous one, we assume they have
larger entropy thus need to be kept. For the patch tokens sampled from the initial
frame, we set their previous tokens as zero."

Choice where the paper is silent: the distance is taken between the patch embedding's
outputs *before* the position and time embeddings are added. The spatial `pos_embed`
is shared by all frames and would cancel anyway, but `time_embed[t] - time_embed[t-1]`
would not: it adds the same content-free offset to every token of frame t and would rank
whole frames rather than moving content. (Consequence: the first frame's scores are the
norms of its raw patch tokens, which include the conv bias, so a blank first-frame patch
still scores |bias| while a static later patch scores exactly 0.)

The policy acts once, at the input (in front of block 0, like IA-RED² with D = 1), and
keeps the `keep_ratio` share of patch tokens with the largest scores in each clip.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..backbones.tokens import StageRecord
from ..backbones.tokens import Tokens, apply_keep, to_grid
from .policy import TokenPolicy, register_policy


def temporal_difference_scores(patch_tokens: Tensor, num_frames: int) -> Tensor:
    """L2 distance of every patch token to the same patch one frame earlier.

    Args:
        patch_tokens: (B, T * S, D) patch tokens in JointST order (index n * T + t).
        num_frames: T.

    Returns:
        (B, T * S) scores in the same order; frame 0 is compared with a zero vector.
    """
    B, L, D = patch_tokens.shape
    if L % num_frames != 0:
        raise ValueError(f"{L} tokens are not a whole number of {num_frames} frames")
    x = patch_tokens.reshape(B, L // num_frames, num_frames, D)              # (B, S, T, D)
    prev = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], dim=2)   # token at t - 1
    return (x - prev).norm(dim=-1).reshape(B, L)


def top_fraction(scores: Tensor, keep_ratio: float) -> Tensor:
    """(B, N) bool keeping the round(keep_ratio * N) highest scores of each row (at least one).

    Rounded half up, as the random and attention baselines count (`baselines.keep_count`),
    so all methods keep the same number of tokens at the same ratio.
    """
    B, N = scores.shape
    k = max(1, min(N, math.floor(keep_ratio * N + 0.5)))
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


class TemporalDifferencePolicy(TokenPolicy):
    """Keeps the patch tokens that changed most since the previous frame (at the input).

    Args:
        keep_ratio: share of the clip's patch tokens that go on to the blocks.
    """

    budget_setting = "keep_ratio"

    def __init__(self, keep_ratio: float = 0.3):
        super().__init__()
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.keep_ratio = float(keep_ratio)

    def config(self) -> dict[str, Any]:
        return {"name": "tempdiff", "keep_ratio": self.keep_ratio}

    def acts_before(self, index: int) -> bool:
        return index == 0

    def forward(self, index: int, tokens: Tokens, model: nn.Module, mode: Any = None):
        if not self.acts_before(index):
            return tokens, None
        raw = model.raw_patch_tokens(tokens)                                  # (B, T*S, D)
        scores = temporal_difference_scores(raw, model.num_frames)
        keep = top_fraction(scores, self.keep_ratio)
        G = model.grid_size
        record = StageRecord(block=0, entering=to_grid(tokens.patch_valid, tokens, G, fill=False),
                             keep=to_grid(keep, tokens, G, fill=False), scores=to_grid(scores, tokens, G))
        return apply_keep(tokens, keep), record


@register_policy("tempdiff", TemporalDifferencePolicy)
def _build_tempdiff(model: nn.Module, keep_ratio: float = 0.3, **kw) -> TemporalDifferencePolicy:
    if not hasattr(model, "raw_patch_tokens") or not hasattr(model, "num_frames"):
        raise ValueError("the tempdiff policy needs a video backbone (e.g. jointst_custom)")
    if kw:
        raise TypeError(f"unknown tempdiff settings: {', '.join(kw)}")
    return TemporalDifferencePolicy(keep_ratio)
