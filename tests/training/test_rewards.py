"""Eq. 2 reward and the self-critical advantage against hand-worked values."""

import torch

from iared.training.rewards import reward, self_critical_advantage


def test_reward_hand_values():
    correct = torch.tensor([True, True, False, True])
    kept = torch.tensor([3, 0, 5, 8])
    entering = torch.tensor([4, 4, 8, 8])
    r = reward(correct, kept, entering, tau=0.5)
    # 1 - (3/4)^2 = 0.4375; 1 - 0 = 1; wrong -> -tau; all kept -> 0
    assert torch.allclose(r, torch.tensor([0.4375, 1.0, -0.5, 0.0]))


def test_reward_uses_entering_tokens_not_grid():
    # 2 of the 4 tokens that reached the group kept: (2/4)^2, whatever the grid size.
    r = reward(torch.tensor([True]), torch.tensor([2]), torch.tensor([4]), tau=1.0)
    assert torch.allclose(r, torch.tensor([0.75]))


def test_reward_wrong_prediction_ignores_keep_count():
    r = reward(torch.tensor([False, False]), torch.tensor([0, 9]), torch.tensor([9, 9]), tau=2.0)
    assert torch.equal(r, torch.tensor([-2.0, -2.0]))


def test_self_critical_advantage_is_difference_and_constant():
    rs = torch.tensor([0.4375, -0.5], requires_grad=True)
    rg = torch.tensor([0.75, 0.75])
    a = self_critical_advantage(rs, rg)
    assert torch.allclose(a, torch.tensor([-0.3125, -1.25]))
    assert not a.requires_grad
