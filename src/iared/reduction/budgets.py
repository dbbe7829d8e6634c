"""Setting a policy's budget from calibration images, so methods can be compared at equal cost.

Budgets. Every method is set to keep about `keep_ratio` of the patch tokens, measured as
the mean over blocks and images of the patch tokens entering each block (from
`ReductionInfo.block_tokens`): that is the quantity the FLOPs follow, so methods that drop
at different depths (once at the input, per group, per block) are comparable.

* IA-RED² (`calibrate_iared`): with D groups the cumulative keep after group j is
  q^(j+1), q solving mean_j q^(j+1) = keep_ratio (a geometric schedule, decreasing like
  the paper's Fig. 4; 0.6 with D = 3 gives 0.77 / 0.59 / 0.45); each group's threshold is
  a quantile of its scores on the calibration batch (`calibrate_thresholds`).
* Other policies (`calibrate_knob`): their budget is bisected until the calibration
  batch's keep ratio is within 0.01 of the target.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Union

import torch
from torch import Tensor, nn

from ..backbones.tokens import ReductionInfo
from .interpreter import has_interpreters


def mean_keep(info: ReductionInfo, num_prefix: int) -> Tensor:
    """(B,) mean over blocks of the fraction of patch tokens entering each block."""
    return ((info.block_tokens.double() - num_prefix) / info.grid_size).mean(dim=1)


def geometric_schedule(keep_ratio: float, groups: int) -> list[float]:
    """Cumulative keep after each group, q^(j+1), with mean_j q^(j+1) = keep_ratio."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # the mean is increasing in q: bisection
        q = (lo + hi) / 2
        if sum(q ** (j + 1) for j in range(groups)) / groups < keep_ratio:
            lo = q
        else:
            hi = q
    q = (lo + hi) / 2
    return [q ** (j + 1) for j in range(groups)]


@torch.inference_mode()
def calibrate_iared(model: nn.Module, images: Tensor, keep_ratio: float) -> list[float]:
    """Set the IA-RED² thresholds so the model keeps about `keep_ratio` (see above).

    Args:
        model: a backbone patched with the "iared" policy (eval mode).
        images: the calibration batch.
        keep_ratio: target mean fraction of patch tokens entering a block.

    Returns:
        The thresholds, one per group (also set on `model.policy.threshold`).
    """
    cumulative = geometric_schedule(keep_ratio, model.policy.groups)
    steps = [c / (cumulative[j - 1] if j else 1.0) for j, c in enumerate(cumulative)]  # share of those entering
    model.policy.threshold = calibrate_thresholds(model, images, steps)
    return model.policy.threshold


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, images: Tensor, keep: Union[float, Sequence[float]]) -> list[float]:
    """Per-group keep thresholds under which group j keeps `keep[j]` of the tokens entering it.

    The trained threshold (0.5) sits wherever REINFORCE left the scores; reading the
    interpreters' ranking at a chosen budget instead takes thresholds from calibration
    images: group j's is the (1 - keep)-quantile of the scores of the tokens entering it,
    with groups 1..j-1 at their calibrated thresholds. Use images the evaluation does not.

    Args:
        model: a backbone patched with an `IARedPolicy` (its thresholds are restored after).
        images: (B, C, H, W) calibration images.
        keep: share of the entering tokens each group keeps, in (0, 1]: one for all
            groups, or one per group.

    Returns:
        D thresholds, one per group (set them as `model.policy.threshold`).
    """
    policy = model.policy
    steps = [float(keep)] * policy.groups if isinstance(keep, (int, float)) else [float(k) for k in keep]
    if len(steps) != policy.groups or not all(0.0 < k <= 1.0 for k in steps):
        raise ValueError(f"keep must be in (0, 1], one value or one per group ({policy.groups}), got {keep}")
    saved, thresholds = policy.threshold, []
    try:
        for j in range(policy.groups):
            policy.threshold = thresholds + [-1.0] * (policy.groups - j)  # later groups keep every token
            _, info = model(images, return_info=True, mode="greedy")
            rec = info.stages[j]
            scores = rec.scores[rec.entering].float()
            thresholds.append(float(torch.quantile(scores, 1.0 - steps[j])) if steps[j] < 1.0 else -1.0)
    finally:
        policy.threshold = saved
    return thresholds


@torch.inference_mode()
def calibrate_knob(model: nn.Module, images: Tensor, keep_ratio: float, steps: int = 6,
                   tol: float = 0.01) -> Any:
    """Bisect a policy's budget (`rho`, `keep_ratio`, ...) until the keep ratio is near the target;
    IA-RED²'s thresholds are set by `calibrate_iared` instead.

    ToMe's `r` (tokens merged per block) is an integer that keeps less as it grows: it is
    bisected over 0..grid_size // 2 (past that every block merges all it may) and set to
    the value whose keep ratio is closest to the target.

    Args:
        model: a backbone with a policy attached (eval mode).
        images: the calibration batch.
        keep_ratio: target mean fraction of patch tokens entering a block.
        steps: at most this many forwards (for `r`: about log2(grid_size) of them).
        tol: stop when the keep ratio is within `tol` of the target (a float knob).

    Returns:
        The budget set on the policy, or None when the policy has no budget.
    """
    policy = model.policy
    if has_interpreters(model):
        return calibrate_iared(model, images, keep_ratio)
    if getattr(policy, "budget_setting", None) is None:
        return None
    P = model.num_prefix_tokens

    def keeps(value: Any) -> float:
        policy.budget = value
        reset = getattr(model.policy, "reset", None)
        if callable(reset):
            reset()
        _, info = model(images, return_info=True, execution="compact")
        return float(mean_keep(info, P).mean())

    if policy.budget_setting == "r":
        # Integer bisection: the two values around the target are both tried (log2(G) forwards).
        lo, hi, best = 0, model.grid_size // 2, (math.inf, 0)
        while lo <= hi:
            r = (lo + hi) // 2
            got = keeps(r)
            best = min(best, (abs(got - keep_ratio), r))
            lo, hi = (r + 1, hi) if got > keep_ratio else (lo, r - 1)
        policy.budget = best[1]
        return best[1]
    lo, hi, value = 0.0, 1.0, keep_ratio  # the other knobs keep more as they grow, up to 1
    best = (math.inf, value)
    for _ in range(steps):
        got = keeps(value)
        best = min(best, (abs(got - keep_ratio), value))
        if abs(got - keep_ratio) <= tol:
            break
        lo, hi = (value, hi) if got < keep_ratio else (lo, value)
        value = (lo + hi) / 2
    policy.budget = best[1]
    return best[1]
