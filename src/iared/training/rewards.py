"""The IA-RED² reward (Eq. 2) and the self-critical advantage (Eq. 3), as pure functions.

    R(u) = 1 - (|u|_0 / N)^2    if the prediction is correct
         = -tau                 otherwise

N is the number of patch tokens that *enter* the group being trained (tokens dropped by
an earlier group are not the current interpreter's decision), |u|_0 how many of those it
keeps. The advantage compares a Bernoulli sample u with the greedy configuration û
(u_i = 1 iff I_ij > 0.5) evaluated by the same network: A = R(u) - R(û) (Rennie et al.'s
self-critical baseline).
"""

from __future__ import annotations

import torch
from torch import Tensor


def reward(correct: Tensor, kept: Tensor, entering: Tensor, tau: float) -> Tensor:
    """Eq. 2, per image.

    Args:
        correct: (B,) bool, whether the prediction made with these actions is right.
        kept: (B,) number of entering patch tokens kept, |u|_0.
        entering: (B,) number of patch tokens entering the group, N (>= 1).
        tau: penalty for a wrong prediction (R = -tau).

    Returns:
        (B,) float rewards.
    """
    ratio = kept.float() / entering.float().clamp_min(1.0)
    return torch.where(correct.bool(), 1.0 - ratio.square(), torch.full_like(ratio, -float(tau)))


def self_critical_advantage(sample_reward: Tensor, greedy_reward: Tensor) -> Tensor:
    """A = R(u) - R(û) (Eq. 3), per image; a constant for the gradient (detached)."""
    return (sample_reward - greedy_reward).detach()
