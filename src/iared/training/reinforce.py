"""REINFORCE for one multi-head interpreter (IA-RED² Eq. 3), and the training step using it.

The gradient of Eq. 3 for interpreter j is

    grad_Wj J = E_u[ A * grad_Wj sum_i log( I_ij u_i + (1 - I_ij)(1 - u_i) ) ],

which is the gradient of the loss  -A * sum_i log pi(u_i)  with A held constant. The sum
runs over the tokens entering group j only: a token dropped earlier has no action here.
log I and log(1 - I) come from `log_keep_drop` (log-sigmoids of the per-head logits), so
the loss is finite even when an interpreter is saturated.

`reinforce_step` is one "task" of the shared training loop (see `loop.py`): two forwards
of the same network, both with earlier groups greedy (their interpreters are trained and
frozen) and later groups keeping everything ("all"),

* group j samples u ~ Bernoulli(I_j)            -> R(u), and the log-probabilities;
* group j keeps I_ij > 0.5 (the greedy û)       -> R(û), without gradient.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from ..reduction.interpreter import log_keep_drop
from .rewards import reward, self_critical_advantage


def action_log_prob(head_logits: Tensor, actions: Tensor, entering: Tensor) -> Tensor:
    """sum_i log pi(u_i) over the tokens entering the group, per image.

    Args:
        head_logits: (B, G, H) per-head interpreter logits on the patch grid.
        actions: (B, G) bool, u_i (True = keep).
        entering: (B, G) bool, tokens that reached the group (the others are ignored).

    Returns:
        (B,) log-probability of the actions under the Bernoulli policy.
    """
    log_keep, log_drop = log_keep_drop(head_logits)                 # (B, G) each
    logp = torch.where(actions.bool(), log_keep, log_drop)
    return (logp * entering.to(logp.dtype)).sum(dim=1)


def policy_gradient_loss(head_logits: Tensor, actions: Tensor, entering: Tensor, advantage: Tensor) -> Tensor:
    """The loss whose gradient is (minus) Eq. 3, averaged over the batch.

    Args:
        head_logits: (B, G, H) per-head logits of the interpreter being trained.
        actions: (B, G) bool sampled actions u.
        entering: (B, G) bool tokens entering the group.
        advantage: (B,) A = R(u) - R(û), treated as a constant.

    Returns:
        Scalar: mean_b( -A_b * sum_i log pi(u_bi) ).
    """
    return -(advantage.detach() * action_log_prob(head_logits, actions, entering)).mean()


def group_modes(group: int, groups: int, current: str) -> list[str]:
    """Per-group interpreter modes while group `group` (0-based) is trained.

    Earlier groups are greedy (as at inference), the current one uses `current`, and
    later ones keep every token (the paper: "the multi-head interpreter in the latter
    groups will be masked and keep all of the tokens").
    """
    return ["greedy"] * group + [current] + ["all"] * (groups - group - 1)


@contextmanager
def only_requires_grad(model: nn.Module, part: nn.Module) -> Iterator[None]:
    """Within the block, only `part`'s parameters require grad (flags restored after).

    Eq. 3 is a gradient with respect to W_j alone. The log-probabilities also depend on
    the tokens entering group j, i.e. on the frozen backbone; turning its gradients off
    makes the loss's gradient reach interpreter j only, whatever the caller froze, and
    spares building a graph through the backbone.
    """
    own = {id(p) for p in part.parameters()}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in own)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator))


def reinforce_step(model: nn.Module, batch: dict[str, Any], *, group: int, groups: int, tau: float,
                   generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """One REINFORCE step for interpreter `group` (0-based): loss, output and metrics.

    Args:
        model: a backbone patched with an `IARedPolicy` of `groups` groups.
        batch: {"image": (B, C, H, W), "label": (B,)} on the model's device.
        group: index j of the interpreter being trained.
        groups: D.
        tau: penalty of a wrong prediction (Eq. 2).
        generator: explicit source of the Bernoulli draws, so a run is reproducible
            (and resumable) whatever else uses the global RNG.

    Returns:
        {"loss": scalar, "output": sampled-forward logits, "metrics": {name: float}}.
    """
    images, labels = batch["image"], batch["label"]
    with torch.no_grad():
        logits_g, info_g = model(images, return_info=True, mode=group_modes(group, groups, "greedy"),
                                 execution="mask")
    # The policy draws from the global RNG: fork it and seed it from our own generator.
    devices = [images.device.index or 0] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), only_requires_grad(model, model.policy.interpreters[group]):
        if generator is not None:
            torch.manual_seed(_seed_from(generator))
        logits_s, info_s = model(images, return_info=True, mode=group_modes(group, groups, "sample"),
                                 execution="mask")
    rec_s, rec_g = info_s.stages[group], info_g.stages[group]
    entering = rec_s.entering.sum(dim=1)
    r_sample = reward(logits_s.argmax(-1) == labels, rec_s.keep.sum(dim=1), entering, tau)
    r_greedy = reward(logits_g.argmax(-1) == labels, rec_g.keep.sum(dim=1), rec_g.entering.sum(dim=1), tau)
    advantage = self_critical_advantage(r_sample, r_greedy)
    loss = policy_gradient_loss(rec_s.extras["head_logits"], rec_s.keep, rec_s.entering, advantage)
    n_entering = entering.float().clamp_min(1)
    metrics = {
        "loss": float(loss.detach()),
        "reward": float(r_sample.mean()),
        "reward_greedy": float(r_greedy.mean()),
        "acc_sample": float((logits_s.argmax(-1) == labels).float().mean() * 100),
        "acc": float((logits_g.argmax(-1) == labels).float().mean() * 100),
        # share of the entering tokens the greedy policy keeps at this group
        "keep_greedy": float((rec_g.keep.sum(dim=1) / n_entering).mean()),
        "keep_sample": float((rec_s.keep.sum(dim=1) / n_entering).mean()),
    }
    return {"loss": loss, "output": logits_s, "metrics": metrics}
