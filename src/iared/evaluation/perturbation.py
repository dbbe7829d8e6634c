"""Faithfulness of a heatmap without masks: Chefer et al.'s positive and negative perturbation.

Patch tokens are removed in the order a heatmap ranks them, in steps of a tenth of the
tokens, and top-1 accuracy is measured after each step:

* positive perturbation removes the most relevant tokens first: a faithful heatmap makes
  accuracy fall fast (lower area under the curve is better);
* negative perturbation removes the least relevant first: accuracy should hold (higher
  area is better).

Chefer et al. blank pixels; here the tokens are dropped before the first block (the
model never sees them), which is what token reduction does and avoids the
out-of-distribution grey patches pixel blanking feeds the model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..reduction.baselines import KeepMask

FRACTIONS = tuple(i / 10 for i in range(10))  # 0 %, 10 %, ..., 90 % of the tokens removed


def removal_keep(relevance: Tensor, fraction: float, most_relevant_first: bool) -> Tensor:
    """Which tokens survive removing round(fraction * N) of them in relevance order.

    Args:
        relevance: (B, N) heatmap values, higher = more relevant.
        fraction: share of the N tokens removed, in [0, 1].
        most_relevant_first: positive perturbation (True) or negative (False).

    Returns:
        (B, N) bool, True = kept. Ties are broken by token index (a stable sort), so a
        constant heatmap removes tokens in raster order.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    B, N = relevance.shape
    k = int(round(fraction * N))
    order = relevance.argsort(dim=1, descending=most_relevant_first, stable=True)
    keep = torch.ones(B, N, dtype=torch.bool, device=relevance.device)
    keep.scatter_(1, order[:, :k], False)
    return keep


def area_under_curve(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoidal area under values(fraction), divided by the fraction span (a mean level)."""
    if len(fractions) != len(values) or len(fractions) < 2:
        raise ValueError("need as many values as fractions, at least two")
    x = torch.tensor(fractions, dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64)
    return float(torch.trapezoid(y, x) / (x[-1] - x[0]))


@torch.no_grad()
def perturbation_correct(model: nn.Module, images: Tensor, labels: Tensor, relevance: Tensor,
                         fractions: Sequence[float] = FRACTIONS, most_relevant_first: bool = True) -> Tensor:
    """Correct top-1 predictions of `model` after each removal step.

    Args:
        model: a backbone with no policy attached; a `KeepMask` policy is attached and
            removed again here.
        images: (B, C, H, W), normalised.
        labels: (B,) class indices.
        relevance: (B, N) heatmap on the patch grid.
        fractions: shares of tokens removed.
        most_relevant_first: positive (True) or negative (False) perturbation.

    Returns:
        (len(fractions),) number of correct predictions at each step.
    """
    from ..patch import patch, unpatch

    if getattr(model, "policy", None) is not None:
        raise ValueError("perturbation_correct needs the bare backbone (its policy would drop tokens too)")
    policy = KeepMask()
    patch(model, policy=policy)
    try:
        out = []
        for f in fractions:
            policy.keep = removal_keep(relevance, f, most_relevant_first)
            logits = model(images)
            out.append((logits.argmax(-1) == labels).sum())
        return torch.stack(out)
    finally:
        unpatch(model)
