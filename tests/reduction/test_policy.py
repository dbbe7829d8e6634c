"""One budget for every registered policy: `iared.patch(..., budget=)` and `model.policy.budget`."""

import sys
import warnings

import pytest
import torch

import iared
from iared.reduction.policy import budget_setting
from helpers import peaked, tiny

# Per budget setting: a value that keeps more tokens, one that keeps fewer.
MORE_AND_LESS = {"threshold": (0.0, 0.9), "rho": (1.0, 0.3), "keep_ratio": (0.9, 0.3), "keep_rate": (0.9, 0.3),
                 "r": (1, 8)}


def _model(name):
    if name == "tempdiff":  # a video policy
        torch.manual_seed(0)
        return iared.create_model("jointst_custom", img_size=32, patch_size=8, num_frames=2, embed_dim=32,
                                  depth=6, num_heads=2, num_classes=5).eval()
    return peaked(tiny())


def _kept(model, x):
    with torch.no_grad():
        _, info = model(x, return_info=True)
    return float(info.block_tokens[:, -1].float().mean())


@pytest.mark.parametrize("name", iared.available_policies())
def test_budget_is_one_attribute_for_every_policy(name):
    setting = budget_setting(name)
    assert setting in MORE_AND_LESS
    more, less = MORE_AND_LESS[setting]
    model = _model(name)
    x = torch.randn(3, 3, 32, 32) if name != "tempdiff" else torch.randn(3, 3, 2, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a default that drops nothing warns; tested below
        iared.patch(model, name, budget=more)
    assert model.policy.budget_setting == setting and model.policy.budget == more
    assert getattr(model.policy, setting) == more
    kept_more = _kept(model, x)
    model.policy.budget = less  # settable after patching, and it reaches the blocks
    assert model.policy.budget == less
    assert _kept(model, x) < kept_more


def test_a_budget_that_drops_nothing_warns_once():
    sys.modules["iared.patch"]._WARNED.discard("topk")
    model = tiny()
    with pytest.warns(UserWarning, match="'topk' as patched drops no token"):
        iared.patch(model, "topk")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iared.patch(model, "topk")            # once
        iared.patch(model, "topk", budget=0.5)  # and never with a budget given


def test_untrained_interpreters_warn_and_indeed_keep_every_token():
    sys.modules["iared.patch"]._WARNED.discard("iared")
    model = tiny()
    with pytest.warns(UserWarning, match="untrained interpreters"):
        iared.patch(model, "iared", groups=3)
    assert _kept(model, torch.randn(4, 3, 32, 32)) == 65  # the claim the warning makes
    with torch.no_grad():
        model.policy.interpreters[0].q.bias[0] += 1.0  # no longer the constant start
    assert model.policy.drops_nothing() is None


def test_loading_a_model_file_never_warns_about_the_fresh_policy_it_replaces(tmp_path):
    model = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        iared.patch(model, "iared", groups=3)
    iared.save_model(model, tmp_path / "m.safetensors", arch="vit_custom")
    sys.modules["iared.patch"]._WARNED.discard("iared")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its interpreters are built fresh, then the file's weights load
        back = iared.load_model(tmp_path / "m.safetensors")
    assert type(back.policy).__name__ == type(model.policy).__name__
    assert "iared" not in sys.modules["iared.patch"]._WARNED  # a later inert patch still warns
