"""The policy-gradient loss of Eq. 3 and the REINFORCE step, against hand-worked values."""

import math

import pytest
import torch

import iared
from iared.training.reinforce import (action_log_prob, group_modes, policy_gradient_loss, reinforce_step)


def test_action_log_prob_single_head():
    # H = 1: I = sigmoid(z). z = 0 -> I = 0.5, z = ln 3 -> I = 0.75.
    z = torch.tensor([[[0.0], [math.log(3)], [math.log(3)]]])          # (1, 3, 1)
    actions = torch.tensor([[True, True, False]])
    lp = action_log_prob(z, actions, torch.tensor([[True, True, True]]))
    assert torch.allclose(lp, torch.tensor([math.log(0.5 * 0.75 * 0.25)]))
    # a token that did not enter the group contributes nothing
    lp = action_log_prob(z, actions, torch.tensor([[True, False, True]]))
    assert torch.allclose(lp, torch.tensor([math.log(0.5 * 0.25)]))


def test_action_log_prob_averages_heads_before_the_log():
    # sigmoids 0.75 and 0.25 average to I = 0.5 (not exp(mean(log))).
    z = torch.tensor([[[math.log(3), -math.log(3)]]])                  # (1, 1, 2)
    keep = action_log_prob(z, torch.tensor([[True]]), torch.tensor([[True]]))
    drop = action_log_prob(z, torch.tensor([[False]]), torch.tensor([[True]]))
    assert torch.allclose(keep, torch.tensor([math.log(0.5)]))
    assert torch.allclose(drop, torch.tensor([math.log(0.5)]))


def test_policy_gradient_loss_value_and_gradient():
    z = torch.tensor([[[math.log(3)], [0.0], [5.0]]], requires_grad=True)  # I = 0.75, 0.5, ...
    actions = torch.tensor([[True, False, True]])
    entering = torch.tensor([[True, True, False]])
    A = torch.tensor([2.0])
    loss = policy_gradient_loss(z, actions, entering, A)
    assert torch.allclose(loss, torch.tensor(-2.0 * math.log(0.75 * 0.5)))
    loss.backward()
    # d log I / dz = 1 - I ; d log(1 - I) / dz = -I ; loss = -A * sum
    expected = torch.tensor([[[-2.0 * 0.25], [-2.0 * -0.5], [0.0]]])
    assert torch.allclose(z.grad, expected)


def test_policy_gradient_loss_is_batch_mean():
    z = torch.zeros(2, 1, 1)
    loss = policy_gradient_loss(z, torch.ones(2, 1, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool),
                                torch.tensor([1.0, 3.0]))
    assert torch.allclose(loss, torch.tensor(-(1.0 + 3.0) / 2 * math.log(0.5)))


def test_policy_gradient_loss_finite_when_saturated():
    z = torch.tensor([[[200.0, 150.0], [-200.0, -300.0]]], requires_grad=True)
    # keep a token the policy is sure to drop and vice versa: log-probabilities ~ -200
    loss = policy_gradient_loss(z, torch.tensor([[False, True]]), torch.ones(1, 2, dtype=torch.bool),
                                torch.tensor([1.0]))
    loss.backward()
    assert torch.isfinite(loss) and loss > 100
    assert torch.isfinite(z.grad).all()


def test_group_modes():
    assert group_modes(0, 3, "sample") == ["sample", "all", "all"]
    assert group_modes(1, 3, "greedy") == ["greedy", "greedy", "all"]
    assert group_modes(2, 3, "sample") == ["greedy", "greedy", "sample"]


def _tiny_model():
    torch.manual_seed(0)
    model = iared.create_model("vit_custom", img_size=16, patch_size=4, in_chans=1, num_classes=3,
                               embed_dim=16, depth=3, num_heads=2)
    return iared.patch(model, policy="iared", groups=3)


@pytest.mark.parametrize("group", [0, 1, 2])
def test_gradient_reaches_only_interpreter_j(group):
    model = _tiny_model().train()
    batch = {"image": torch.randn(6, 1, 16, 16), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    # make the advantage non-zero for sure: tau large, so wrong sampled predictions cost
    out = reinforce_step(model, batch, group=group, groups=3, tau=5.0, generator=torch.Generator().manual_seed(1))
    out["loss"].backward()
    prefix = f"policy.interpreters.{group}."
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached, "no gradient at all"
    assert all(n.startswith(prefix) for n in reached), sorted(reached)
    # every parameter still requires grad afterwards (the flags were restored)
    assert all(p.requires_grad for p in model.parameters())


def test_reinforce_step_is_reproducible_with_generator():
    model = _tiny_model().train()
    batch = {"image": torch.randn(4, 1, 16, 16), "label": torch.tensor([0, 1, 2, 0])}
    a = reinforce_step(model, batch, group=0, groups=3, tau=1.0, generator=torch.Generator().manual_seed(3))
    torch.rand(10)  # disturbing the global RNG must not matter
    b = reinforce_step(model, batch, group=0, groups=3, tau=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["output"], b["output"]) and a["metrics"] == b["metrics"]
