"""Budget calibration (`iared.reduction.budgets`): the geometric schedule, IA-RED²'s thresholds, and
the bisected knob of the other policies."""

from __future__ import annotations

import math

import pytest
import torch

import iared
from iared.reduction.budgets import calibrate_iared, calibrate_knob, geometric_schedule, mean_keep

from helpers import peaked, tiny


TINY = "vit_tiny8_patch4_32"  # dim 8, depth 6, 64 patches: fast enough for tests


def test_geometric_schedule_hand_values():
    # D = 1: keep r; D = 2: q + q^2 = 2r, r = 0.75 -> q = (-1 + sqrt(1 + 6)) / 2
    assert geometric_schedule(0.6, 1) == pytest.approx([0.6])
    q = (-1 + math.sqrt(7)) / 2
    assert geometric_schedule(0.75, 2) == pytest.approx([q, q * q])
    c = geometric_schedule(0.6, 3)
    assert sum(c) / 3 == pytest.approx(0.6) and c[0] > c[1] > c[2]
    with pytest.raises(ValueError):
        geometric_schedule(0.0, 3)


@pytest.mark.filterwarnings("ignore:policy 'iared' as patched drops no token")
def test_calibrated_iared_lands_near_the_keep_ratio():
    torch.manual_seed(0)
    model = iared.patch(iared.create_model(TINY).eval(), policy="iared", groups=3)
    images = torch.randn(16, 3, 32, 32)
    thresholds = calibrate_iared(model, images, 0.6)
    assert len(thresholds) == 3 and model.policy.threshold == thresholds
    with torch.no_grad():
        _, info = model(images, return_info=True)
    # quantiles on 16 x 64 tokens: within a couple of tokens per image of the target
    assert float(mean_keep(info, 1).mean()) == pytest.approx(0.6, abs=0.03)
    kept_after = [float(s.keep.float().mean()) for s in info.stages]
    assert kept_after == pytest.approx(geometric_schedule(0.6, 3), abs=0.03)


@pytest.mark.filterwarnings("ignore:policy 'topk' as patched drops no token")
@pytest.mark.parametrize("name,attr", [("random", "keep_ratio"), ("topk", "rho")])
def test_calibrate_knob_moves_the_budget(name, attr):
    model = iared.patch(iared.create_model(TINY).eval(), policy=name)
    images = torch.randn(4, 3, 32, 32)
    value = calibrate_knob(model, images, 0.5)
    with torch.no_grad():
        _, info = model(images, return_info=True)
    got = float(mean_keep(info, 1).mean())
    assert value is not None and value < 1.0
    assert got == pytest.approx(0.5, abs=0.08)


def test_calibrated_thresholds_keep_the_asked_share_per_group():
    from iared.reduction.budgets import calibrate_thresholds

    m = iared.patch(tiny(depth=6), policy="iared", groups=3)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    images = torch.randn(16, 3, 32, 32)
    t = calibrate_thresholds(m, images, 0.75)
    assert len(t) == 3 and m.policy.threshold == 0.5  # restored
    m.policy.threshold = t
    with torch.no_grad():
        _, info = m.eval()(images, return_info=True)
    for rec in info.stages:  # each group keeps 75 % of what enters it, to one token in 64 * 16
        share = rec.keep.sum().item() / rec.entering.sum().item()
        assert abs(share - 0.75) < 0.02, share
    assert calibrate_thresholds(m, images, 1.0) == [-1.0] * 3


def test_calibrate_knob_bisects_keep_rate():
    m = peaked(tiny())
    iared.patch(m, policy="evit")
    images = torch.randn(4, 3, 32, 32)
    value = calibrate_knob(m, images, 0.5)
    assert value is not None and m.policy.keep_rate == value and 0 < value < 1


def test_calibrate_knob_sets_an_integer_r():
    m = iared.patch(tiny(), policy="tome")
    images = torch.randn(2, 3, 32, 32)
    r = calibrate_knob(m, images, 0.5)
    assert isinstance(r, int) and m.policy.r == r
    with torch.no_grad():
        keeps = {}
        for v in range(0, 33):
            m.policy.r = v
            _, info = m(images, return_info=True)
            keeps[v] = float(mean_keep(info, 1).mean())
    assert abs(keeps[r] - 0.5) == min(abs(k - 0.5) for k in keeps.values())  # the closest r there is
