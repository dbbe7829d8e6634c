"""`iared.patch`: settings a policy cannot take are a ValueError, and the model keeps no policy."""

import pytest
import torch

import iared
from iared.backbones import create_model


def test_invalid_settings_are_value_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        create_model("vit_custom", embed_dim=10, num_heads=3)
    m = create_model("vit_custom", img_size=16, patch_size=4, embed_dim=8, depth=6, num_heads=2)
    for kw in ({"rho": 17.0}, {"rho": 0.0}, {"rho": True}, {"K": 0}, {"K": [4, 0, 4, 4]}, {"min_k": 0}):
        with pytest.raises(ValueError):
            iared.patch(m, "ats", **kw)
    with pytest.raises(ValueError, match="2 thresholds for 3 groups"):
        iared.patch(m, "iared", groups=3, threshold=[0.5, 0.5])
    assert m.policy is None


# -- every registered policy on every registry architecture (timm's test_models idea) -----

def _small(arch: str):
    """`arch` at width 24, depth 6, a 4x4 patch grid (and 2 frames for video): cheap, same code."""
    patch = int(arch.split("patch")[1].split("_")[0]) if "patch" in arch else 16
    kw = dict(embed_dim=24, depth=6, num_heads=2, img_size=4 * patch, num_classes=5)
    if "jointst" in arch:
        kw["num_frames"] = 2
    torch.manual_seed(0)
    return create_model(arch, **kw).eval(), patch


def _inputs(model, patch: int):
    torch.manual_seed(1)
    frames, chans = getattr(model, "num_frames", None), model.config.in_chans
    shape = (3, chans, frames, 4 * patch, 4 * patch) if frames else (3, chans, 4 * patch, 4 * patch)
    return torch.randn(*shape)


def _logits(model, x, execution):
    reset = getattr(model.policy, "reset", None)
    if callable(reset):
        reset()  # random dropping: the same draws for both executions
    with torch.no_grad():
        return model(x, execution=execution)


# A budget that drops something on a 16-token grid, per budget setting.
DROPPING = {"threshold": None, "rho": 0.5, "keep_ratio": 0.5, "keep_rate": 0.5, "r": 3}


@pytest.mark.filterwarnings("ignore:policy .* drops no token")
@pytest.mark.parametrize("arch", iared.list_models())
@pytest.mark.parametrize("name", iared.available_policies())
def test_every_policy_on_every_architecture(name, arch, tmp_path):
    from iared.models import load_model, save_model
    from iared.reduction.policy import budget_setting

    model, patch = _small(arch)
    x = _inputs(model, patch)
    plain = _logits(model, x, "compact")
    if name == "tempdiff" and not hasattr(model, "num_frames"):  # the one policy for video only
        with pytest.raises(ValueError, match="needs a video backbone"):
            iared.patch(model, name)
        assert model.policy is None
        return
    iared.patch(model, name, budget=DROPPING[budget_setting(name)])
    compact = _logits(model, x, "compact")
    torch.testing.assert_close(_logits(model, x, "mask"), compact, rtol=1e-4, atol=1e-4)
    path = tmp_path / "m.safetensors"
    save_model(model, path, arch=arch)
    torch.testing.assert_close(_logits(load_model(path), x, "compact"), compact, rtol=1e-5, atol=1e-5)
    iared.unpatch(model)
    assert model.policy is None
    torch.testing.assert_close(_logits(model, x, "compact"), plain, rtol=0, atol=0)
